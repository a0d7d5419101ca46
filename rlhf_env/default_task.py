"""The default task of ``TextRLHF-v0``: its prompts and its preference data.

The task is "answer helpfully in a positive, friendly tone". Everything here is
deterministic and offline; ``python -m rlhf_env.default_task`` rebuilds the shipped
files under ``rlhf_env/assets``:

* ``prompts_train.txt`` / ``prompts_test.txt``: short review openings to continue,
  messages to reply to, everyday questions and requests for advice, made from
  templates x slots and split by a seeded shuffle.
* ``task/pairs_train.jsonl`` / ``task/pairs_test.jsonl``: preference pairs made by
  sampling several responses per prompt from the starting model (SmolLM2-135M-Instruct),
  scoring each with VADER's compound score (an independent scorer, not the reward model)
  and keeping the best and worst response when their scores differ by a clear margin.

* ``task/samples_{split}_r1.jsonl``: a second sampling round (4 more responses per
  prompt, ``--round 1``); the default reward model trains on the pairs of both rounds
  (:func:`all_round_pairs`), the other trainers' default files stay the round-0 pairs.

``python -m rlhf_env.default_task --prompts-only`` rewrites only the prompt files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TASK_DIR = ASSETS / "task"

# ---------------------------------------------------------------------------
# prompts: templates x slots (hand-written, so the set is reviewable and stable)
# ---------------------------------------------------------------------------

_REVIEW_TEMPLATES = [
    "Continue this review of {thing}: \"I tried {thing} last weekend and",
    "Finish this review: \"My honest opinion of {thing} is that",
    "Write the rest of this review: \"After a month with {thing},",
]
_REVIEW_THINGS = [
    "the new Italian restaurant downtown", "a budget pair of wireless earbuds",
    "the latest superhero movie", "a cozy mystery novel", "a local coffee shop",
    "a standing desk", "a sushi place near the station", "an electric toothbrush",
    "a romantic comedy on a streaming service", "a hiking backpack",
    "a Thai food truck", "a robot vacuum", "a board game for families",
    "a small hotel by the sea", "a yoga mat", "an animated film for kids",
    "a bakery on Main Street", "a mechanical keyboard", "a cooking class",
    "a science fiction series", "a pizza delivery app", "a rice cooker",
    "a jazz concert in the park", "a budget airline", "a pair of running shoes",
    "a vegan burger restaurant", "a podcast about history", "a noise-cancelling headset",
    "a museum exhibition on dinosaurs", "a camping tent",
]

_MESSAGE_TEMPLATES = [
    "Reply to this message from {who}: \"{msg}\"",
    "Write a short answer to {who} who wrote: \"{msg}\"",
]
_MESSAGES = [
    ("a friend", "I just got the job I interviewed for last week!"),
    ("a coworker", "Can you help me with the slides for tomorrow's meeting?"),
    ("a neighbour", "Your dog was barking for an hour this morning."),
    ("a friend", "I failed my driving test again."),
    ("a sibling", "Are you coming home for the holidays this year?"),
    ("a customer", "My order arrived two days late and the box was damaged."),
    ("a classmate", "Do you want to study together for the exam on Friday?"),
    ("a friend", "I'm thinking about moving to another city."),
    ("a manager", "Could you stay an hour later today?"),
    ("a friend", "I finally finished running my first marathon!"),
    ("a colleague", "I made a mistake in the report I sent you."),
    ("a friend", "I can't make it to your birthday dinner, sorry."),
    ("a parent", "Did you remember to call your grandmother?"),
    ("a teammate", "We lost the game today, I feel terrible."),
    ("a new neighbour", "Hi, we just moved in next door!"),
    ("a friend", "My cat has been sick all week."),
    ("a client", "We loved the design you sent, but can we change the colours?"),
    ("a friend", "I started learning to play the guitar."),
    ("a colleague", "Thanks for covering my shift yesterday."),
    ("a roommate", "You left the dishes in the sink again."),
    ("a friend", "I'm nervous about my presentation tomorrow."),
    ("a cousin", "We're having a baby!"),
    ("a student", "I don't understand the homework at all."),
    ("a friend", "Want to go hiking this Saturday?"),
    ("a customer", "Do you have this jacket in a larger size?"),
    ("a friend", "I burned the cake I was baking for the party."),
    ("a coworker", "The printer is broken again."),
    ("an old friend", "It's been years! How have you been?"),
    ("a friend", "I got a puppy today!"),
    ("a volunteer", "Can you help at the food bank next week?"),
    ("a friend", "My flight got cancelled and I'm stuck at the airport."),
    ("a coworker", "I'm leaving the company at the end of the month."),
    ("a friend", "I just read a book you would love."),
    ("a guest", "Thank you so much for dinner last night."),
    ("a friend", "I'm having a really stressful week."),
    ("a neighbour", "Would you mind watering my plants while I'm away?"),
    ("a teacher", "Your son did very well on his science project."),
    ("a friend", "I think I'm finally ready to start my own business."),
    ("a coworker", "Do you know where the meeting room is?"),
    ("a friend", "I lost my wallet on the bus."),
]

_QUESTIONS = [
    "How do I keep basil alive?", "How can I fall asleep faster?",
    "What is a good way to start running?", "How do I make a cup of good coffee at home?",
    "How can I save money on groceries?", "What should I pack for a weekend trip?",
    "How do I clean a cast iron pan?", "How can I make new friends as an adult?",
    "What is a simple recipe for dinner tonight?", "How do I learn a new language quickly?",
    "How can I stop procrastinating?", "What are good houseplants for beginners?",
    "How do I get my toddler to eat vegetables?", "How can I be more productive at work?",
    "What should I do on a rainy day?", "How do I fix a squeaky door?",
    "How can I improve my handwriting?", "What is a good gift for my mother?",
    "How do I start a vegetable garden?", "How can I stay warm in winter without high bills?",
    "How do I write a thank-you note?", "What is the best way to study for an exam?",
    "How can I get better at public speaking?", "How do I train my puppy to sit?",
    "How do I make my bread rise better?", "How can I keep my kitchen clean?",
    "What are some fun things to do with kids at home?", "How do I prepare for a job interview?",
    "How can I drink more water during the day?", "How do I choose a good watermelon?",
    "How can I make my small apartment feel bigger?", "How do I stop my glasses from fogging up?",
    "What is a good way to relax after work?", "How do I remove a coffee stain from a shirt?",
    "How can I learn to cook?", "How do I tell a friend I'm upset with them?",
    "What should I read next if I liked Harry Potter?", "How do I keep my phone battery healthy?",
    "How can I make my mornings less rushed?", "How do I ask my boss for a raise?",
    "How do I take care of a succulent?", "What can I cook with leftover rice?",
    "How can I motivate myself to exercise?", "How do I plan a birthday party on a budget?",
    "How do I get rid of fruit flies?", "How can I be a better listener?",
    "What is a good hobby to pick up?", "How do I organise my closet?",
    "How do I make pancakes fluffy?", "How can I help a friend who is sad?",
    "How do I start meditating?", "What should I bring to a picnic?",
    "How can I reduce screen time?", "How do I pick a good book club book?",
    "How can I make my commute more enjoyable?", "How do I care for a new kitten?",
    "How do I stay focused while working from home?", "What is a good way to learn to draw?",
    "How can I get my kids to sleep on time?", "How do I welcome a new neighbour?",
]

_ADVICE_TEMPLATES = [
    "Give me some advice: {situation}",
    "I need help. {situation} What should I do?",
]
_SITUATIONS = [
    "I have my first day at a new job tomorrow.", "my best friend and I had an argument.",
    "I want to ask someone out on a date.", "I feel nervous before exams.",
    "I'm moving to a new city where I know nobody.", "my garden plants keep dying.",
    "I have to give a speech at my sister's wedding.", "I want to get fit but I have little time.",
    "my teenager barely talks to me.", "I'm hosting dinner for my in-laws.",
    "I received harsh feedback at work.", "I want to learn to play piano as an adult.",
    "I keep forgetting people's names.", "my neighbour plays loud music at night.",
    "I'm starting university next month.", "I want to adopt a dog.",
    "I feel lonely working from home.", "I have too many emails to answer.",
    "I'm planning my first solo trip.", "I want to write a novel.",
    "my coworker takes credit for my work.", "I'm retiring next year.",
    "I want to volunteer in my community.", "I get stressed in traffic every day.",
    "I'm trying to eat healthier.", "my old laptop is very slow.",
]

_QUESTION_PREFIXES = ["", "Quick question: "]


def make_prompts() -> list[str]:
    """All default prompts, deduplicated, in a fixed order (before the split).

    :return: the prompt strings
    """
    prompts: list[str] = []
    for template, thing in itertools.product(_REVIEW_TEMPLATES, _REVIEW_THINGS):
        prompts.append(template.format(thing=thing))
    for template, (who, msg) in itertools.product(_MESSAGE_TEMPLATES, _MESSAGES):
        prompts.append(template.format(who=who, msg=msg))
    for prefix, question in itertools.product(_QUESTION_PREFIXES, _QUESTIONS):
        prompts.append(prefix + question)
    for template, situation in itertools.product(_ADVICE_TEMPLATES, _SITUATIONS):
        # the second template starts a new sentence with the situation
        text = situation[0].upper() + situation[1:] if template.startswith("I need") else situation
        prompts.append(template.format(situation=text))
    return list(dict.fromkeys(prompts))


def split_prompts(prompts: list[str], n_test: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split prompts into train and test by a seeded shuffle.

    :param prompts: all prompts
    :param n_test: how many go to the test split
    :param seed: shuffle seed
    :return: ``(train, test)``
    """
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[n_test:], order[:n_test]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_prompts(assets: Path = ASSETS) -> tuple[list[str], list[str]]:
    """Write ``prompts_train.txt`` and ``prompts_test.txt`` (one prompt a line).

    :param assets: the folder to write into
    :return: ``(train, test)``
    """
    train, test = split_prompts(make_prompts())
    _atomic_write_text(assets / "prompts_train.txt", "\n".join(train) + "\n")
    _atomic_write_text(assets / "prompts_test.txt", "\n".join(test) + "\n")
    return train, test


# ---------------------------------------------------------------------------
# preference pairs: sample from the starting model, label with VADER
# ---------------------------------------------------------------------------


def vader_scores(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (the task's independent scorer).

    :param texts: the texts to score
    :return: one compound score per text
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int = 4,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> list[list[str]]:
    """Sample ``num_samples`` responses per prompt with batched, left-padded ``generate``.

    Prompts are formatted by ``rlhf_env.models.encode_prompt``, exactly as the env does.
    Each batch reseeds the generator from ``seed`` and its index, so the output does not
    depend on how far an interrupted run got.

    :return: for each prompt, its decoded responses (special tokens removed, stripped)
    """
    import torch
    from tqdm.auto import tqdm

    from rlhf_env.models import encode_prompt

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling responses", disable=not progress)):
        chunk = prompts[start : start + batch_size]
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        torch.manual_seed(seed * 100_003 + b)
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append([t.strip() for t in texts[i * num_samples : (i + 1) * num_samples]])
    return out


def make_pairs(
    prompts: list[str], responses: list[list[str]], scores: list[list[float]], margin: float = 0.3, max_per_prompt: int | None = None
) -> list[dict]:
    """Preference pairs from scored samples: of two responses, the higher VADER score is chosen.

    Every two distinct, non-empty responses of a prompt whose scores differ by at least
    ``margin`` make a pair (a clear preference, so label noise stays low), largest
    differences first, at most ``max_per_prompt`` per prompt (``None``: all).

    :return: dicts with ``prompt``, ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``
    """
    rows = []
    for prompt, resp, sc in zip(prompts, responses, scores):
        candidates = []
        for i, j in itertools.combinations(range(len(resp)), 2):
            if sc[i] < sc[j]:
                i, j = j, i
            if sc[i] - sc[j] >= margin and resp[i] and resp[j] and resp[i] != resp[j]:
                candidates.append((sc[i] - sc[j], i, j))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for _, i, j in candidates[:max_per_prompt]:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": resp[i],
                    "rejected": resp[j],
                    "chosen_score": round(sc[i], 4),
                    "rejected_score": round(sc[j], 4),
                }
            )
    return rows


def pairs_from_samples(split: str, margin: float = 0.3, out_dir: Path = TASK_DIR, max_per_prompt: int | None = None) -> list[dict]:
    """Rebuild ``pairs_{split}.jsonl`` from the shipped ``samples_{split}.jsonl`` (no sampling).

    :return: the pairs written
    """
    pairs = _pairs_by_prompt(_samples_by_prompt([out_dir / f"samples_{split}.jsonl"]), margin, max_per_prompt)
    _write_jsonl(out_dir / f"pairs_{split}.jsonl", pairs)
    return pairs


def shipped_samples(split: str, task_dir: Path = TASK_DIR) -> dict[str, list[tuple[str, float]]]:
    """Every shipped sample of a split, by prompt: ``samples_{split}.jsonl`` (round 0, the
    one the shipped pairs come from) then the extra rounds ``samples_{split}_r1.jsonl``,
    ``_r2``, ... (see :func:`sample_round`), in that order.

    :return: ``{prompt: [(response, vader_score), ...]}`` in the files' prompt order
    """
    files = [task_dir / f"samples_{split}.jsonl"]
    k = 1
    while (task_dir / f"samples_{split}_r{k}.jsonl").is_file():
        files.append(task_dir / f"samples_{split}_r{k}.jsonl")
        k += 1
    return _samples_by_prompt(files)


def _samples_by_prompt(files: list[Path]) -> dict[str, list[tuple[str, float]]]:
    """``{prompt: [(response, vader_score), ...]}`` from samples files, in file then line order."""
    by_prompt: dict[str, list[tuple[str, float]]] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: a response may hold U+2028
            if not line:
                continue
            row = json.loads(line)
            by_prompt.setdefault(row["prompt"], []).append((row["response"], row["score"]))
    return by_prompt


def _pairs_by_prompt(by_prompt: dict[str, list[tuple[str, float]]], margin: float, max_per_prompt: int | None = None) -> list[dict]:
    """:func:`make_pairs` over the samples of :func:`_samples_by_prompt`."""
    prompts = list(by_prompt)
    responses = [[r for r, _ in by_prompt[p]] for p in prompts]
    scores = [[sc for _, sc in by_prompt[p]] for p in prompts]
    return make_pairs(prompts, responses, scores, margin, max_per_prompt)


def all_round_pairs(split: str, margin: float = 0.3, task_dir: Path = TASK_DIR) -> list[dict]:
    """Preference pairs from all shipped sampling rounds of a split (:func:`shipped_samples`):
    every two responses of a prompt whose VADER scores differ by at least ``margin``.

    With the round-1 files shipped, 8 responses per prompt give 4,124 train pairs (862 from
    round 0 alone): the default reward model trains on these. ``pairs_{split}.jsonl`` stay
    the round-0 pairs.
    """
    return _pairs_by_prompt(shipped_samples(split, task_dir), margin)


def sample_round(
    r: int, model_name: str = "smollm2-135m", max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0,
    device: str = "cpu", out_dir: Path = TASK_DIR, round_size: int = 4,
) -> dict:
    """Sample extra round ``r`` (>= 1) for both splits into ``samples_{split}_r{r}.jsonl``:
    ``round_size`` responses per prompt, seeded exactly as round ``r`` of
    :func:`build_pairs` (train ``seed + 2r``, test ``seed + 1 + 2r``).

    :return: a summary (counts, mean scores, seconds)
    """
    from rlhf_env.models import load_lm

    if r < 1:
        raise ValueError(f"round must be >= 1 (round 0 is samples_{{split}}.jsonl, written by build_pairs), got {r}")
    train, test = split_prompts(make_prompts())
    model, tokenizer = load_lm(model_name, device=device)
    model.eval()
    summary: dict = {"round": r}
    for split, prompts, split_seed in (("train", train, seed), ("test", test, seed + 1)):
        t0 = time.time()
        responses = sample_responses(model, tokenizer, prompts, round_size, max_new_tokens, batch_size, seed=split_seed + 2 * r, device=device)
        flat = [x for rs in responses for x in rs]
        scores = vader_scores(flat)
        rows = [{"prompt": p, "response": x} for p, rs in zip(prompts, responses) for x in rs]
        for row, sc in zip(rows, scores):
            row["score"] = round(sc, 4)
        _write_jsonl(out_dir / f"samples_{split}_r{r}.jsonl", rows)
        summary[split] = {"samples": len(rows), "mean_score": round(sum(scores) / len(scores), 4), "seconds": round(time.time() - t0, 1)}
        print(f"{split}: {summary[split]}", flush=True)
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_pairs(
    model_name: str = "smollm2-135m",
    num_samples: int = 4,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    margin: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
    out_dir: Path = TASK_DIR,
    round_size: int = 4,
    max_per_prompt: int | None = None,
) -> dict:
    """Sample, score and pair responses for both prompt splits; write the JSON Lines files.

    Responses are sampled in rounds of ``round_size`` per prompt (see the code for seeds);
    pairs are made by :func:`make_pairs` with ``margin`` and ``max_per_prompt``.

    Writes ``samples_{split}.jsonl`` (every sampled response with its score) and
    ``pairs_{split}.jsonl`` (the preference pairs) for ``split`` in train/test.

    :return: a summary (counts, mean scores, seconds)
    """
    from rlhf_env.models import load_lm

    train, test = split_prompts(make_prompts())
    model, tokenizer = load_lm(model_name, device=device)
    model.eval()
    summary: dict = {"model": model_name, "num_samples": num_samples, "max_new_tokens": max_new_tokens, "seed": seed}
    for split, prompts, split_seed in (("train", train, seed), ("test", test, seed + 1)):
        t0 = time.time()
        # rounds of `round_size` samples per prompt, round r seeded split_seed + 2r: the first
        # round is the same whatever num_samples, so a larger set extends a smaller one
        responses = [[] for _ in prompts]
        for r in range(-(-num_samples // round_size)):
            k = min(round_size, num_samples - r * round_size)
            got = sample_responses(model, tokenizer, prompts, k, max_new_tokens, batch_size, seed=split_seed + 2 * r, device=device)
            for mine, new in zip(responses, got):
                mine.extend(new)
        flat = [r for rs in responses for r in rs]
        flat_scores = vader_scores(flat)
        scores = [flat_scores[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
        samples = [
            {"prompt": p, "response": r, "score": round(s, 4)}
            for p, rs, ss in zip(prompts, responses, scores)
            for r, s in zip(rs, ss)
        ]
        pairs = make_pairs(prompts, responses, scores, margin=margin, max_per_prompt=max_per_prompt)
        _write_jsonl(out_dir / f"samples_{split}.jsonl", samples)
        _write_jsonl(out_dir / f"pairs_{split}.jsonl", pairs)
        summary[split] = {
            "prompts": len(prompts),
            "samples": len(samples),
            "pairs": len(pairs),
            "mean_score": round(sum(flat_scores) / len(flat_scores), 4),
            "seconds": round(time.time() - t0, 1),
        }
        print(f"{split}: {summary[split]}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_env.default_task",
        description="Rebuild the default task's prompts and preference pairs under rlhf_env/assets.",
    )
    parser.add_argument("--prompts-only", action="store_true", help="only rewrite prompts_train.txt / prompts_test.txt")
    parser.add_argument("--from-samples", action="store_true", help="only rebuild the pairs from the shipped samples_*.jsonl (no sampling)")
    parser.add_argument("--round", type=int, default=None, help="only sample extra round R >= 1 into samples_{train,test}_rR.jsonl "
                        "(the shipped samples_*_r1.jsonl: --round 1 --threads 1)")
    parser.add_argument("--model", default="smollm2-135m", help="starting model to sample from (default: smollm2-135m)")
    parser.add_argument("--num-samples", type=int, default=4, help="responses sampled per prompt (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response at most (default: 48)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: 16)")
    parser.add_argument("--margin", type=float, default=0.3, help="least VADER score difference of a pair (default: 0.3)")
    parser.add_argument("--max-per-prompt", type=int, default=None, help="pairs per prompt at most, largest differences first (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a shared machine)")
    parser.add_argument("--out-dir", type=Path, default=TASK_DIR, help=f"where the JSON Lines go (default: {TASK_DIR})")
    args = parser.parse_args(argv)
    write_prompts()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.prompts_only:
        return 0
    if args.round is not None:
        print(json.dumps(sample_round(args.round, args.model, args.max_new_tokens, args.batch_size, args.seed, args.device, args.out_dir)))
        return 0
    if args.from_samples:
        for split in ("train", "test"):
            print(split, len(pairs_from_samples(split, args.margin, args.out_dir, args.max_per_prompt)), "pairs")
        return 0
    summary = build_pairs(
        args.model, args.num_samples, args.max_new_tokens, args.batch_size, args.margin, args.seed, args.device, args.out_dir,
        max_per_prompt=args.max_per_prompt,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
