"""``rlhf_env.compare`` / ``rlhf-env compare``: every method from the same model at the same
CPU budget, judged by ``rlhf_env.evaluate``, written as JSON, Markdown and a PNG."""

import json
import math

import pytest

from rlhf_env.compare import METHODS, check_methods, dpo_pairs_for_budget, run_comparison

pytestmark = pytest.mark.usefixtures("one_thread")

SECONDS = 0.5  # CPU seconds of training per method


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compare")
    try:
        result = run_comparison(out, model="tiny", seconds=SECONDS, eval_prompts=4, eval_samples=1, max_new_tokens=8,
                                checkpoints=2, dpo_pairs=24, progress=False, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_the_comparison_runs_every_method_and_writes_its_table_and_plot(comparison):
    out, result = comparison
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved["methods"]) == list(METHODS)
    judges = ("reward", "win_rate", "kl", "tone", "negative_share", "relevance", "fluency_nll", "distinct_2", "top_3gram_share")
    for name, m in saved["methods"].items():
        final = m["final"]
        for key in judges:
            assert math.isfinite(final[key]), (name, key)
        assert 0.0 <= final["win_rate"] <= 1.0
        assert set(final["pass_rule"]["checks"]) == {"tone_gain", "relevance_change", "distinct_2_change", "top_3gram_share", "kl"}
        # checkpoints in order of training time, the last one the final evaluation
        seconds = [p["cpu_seconds"] for p in m["checkpoints"]]
        assert seconds == sorted(seconds) and m["checkpoints"][-1] == final
        assert m["samples"] and all({"prompt", "reference", "policy"} <= set(s) for s in m["samples"])
        assert (out / name / "evaluation.json").is_file()
    for name in ("ppo", "grpo", "rloo"):  # an RL method trains until its budget is spent
        assert saved["methods"][name]["cpu_seconds"] >= SECONDS
    assert saved["methods"]["dpo"]["pairs"] >= 24
    # every method is judged against the same reference column: same prompts, same seed
    ref = saved["reference"]
    assert ref["kl"] == 0.0
    for name in METHODS:
        report = json.loads((out / name / "evaluation.json").read_text())
        assert report["reference"]["reward"] == ref["reward"]
        # every column of the evaluate() report is in the summary, the VADER-negative share included
        final = saved["methods"][name]["final"]
        same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (nan-safe)
        assert same({k: final[k] for k in report["policy"]}, report["policy"]) and "negative_share" in final
        assert same({k: ref[k] for k in report["reference"]}, report["reference"])
        assert report["responses"]["reference"] == json.loads((out / "ppo" / "evaluation.json").read_text())["responses"]["reference"]

    table = (out / "compare.md").read_text()
    for name in METHODS:
        rule = saved["methods"][name]["final"]["pass_rule"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |") and ("PASS" in line or "FAIL" in line))
        assert row.rstrip(" |").endswith("PASS" if rule["passed"] else "FAIL")
        assert row.count("FAIL") == sum(not c["ok"] for c in rule["checks"].values()) + (not rule["passed"])
    header = table.splitlines()[2].split(" | ")
    column = header.index("VADER-negative share")
    ref_row = next(line for line in table.splitlines() if line.startswith("| reference"))
    assert ref_row.split(" | ")[column] == f"{ref['negative_share']:.2f}"
    for name in METHODS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[column] == f"{saved['methods'][name]['final']['negative_share']:.2f}"
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_an_unknown_method_is_a_clear_error_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'sac'; valid methods: ppo, grpo, rloo, dpo"):
        run_comparison(tmp_path, methods="ppo,sac", model="no-such-model")
    with pytest.raises(ValueError, match="named twice"):
        check_methods(["ppo", "PPO"])
    assert check_methods(" dpo, grpo ") == ["dpo", "grpo"]


def test_cli_reports_an_unknown_method_in_one_line(tmp_path, capsys):
    from rlhf_env.cli import main

    assert main(["compare", "--methods", "ppo,trpo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'trpo'; valid methods: ppo, grpo, rloo, dpo" in err and "Traceback" not in err


def test_dpo_gets_the_pairs_its_budget_can_prepare_and_train_on():
    from rlhf_env.compare import DPO_SECONDS_PER_PAIR

    per_pair = DPO_SECONDS_PER_PAIR["prepare"] + 2 * DPO_SECONDS_PER_PAIR["epoch"]
    assert dpo_pairs_for_budget(100 * per_pair, epochs=2, available=3802) == 100
    assert dpo_pairs_for_budget(1e6, epochs=2, available=3802) == 3802
    assert dpo_pairs_for_budget(0.01, epochs=2, available=3802) == 16  # at least a few steps' worth


def test_dpo_trains_with_dpoconfigs_defaults_unless_dpo_settings_replace_them(monkeypatch, tmp_path):
    import rlhf_env.dpo
    import rlhf_env.training
    from tqdm.auto import tqdm

    from rlhf_env.compare import CompareConfig, _Budget, _train_dpo
    from rlhf_env.dpo import DPOConfig

    seen = {}

    def fake_train_dpo(pairs, model, tokenizer=None, config=None, **kwargs):
        seen["config"] = config
        return model, tokenizer

    monkeypatch.setattr(rlhf_env.dpo, "train_dpo", fake_train_dpo)
    monkeypatch.setattr(rlhf_env.training, "resolve_lm", lambda *args, **kwargs: (None, None))  # no model needed
    _, info = _train_dpo(CompareConfig(model="tiny", dpo_pairs=24, seed=3), _Budget(1.0, 1, None), tqdm(disable=True))
    assert seen["config"] == DPOConfig(seed=3)  # DPOConfig's defaults: one learning rate for rlhf-env dpo and the comparison
    assert info["hyperparameters"]["learning_rate"] == DPOConfig.learning_rate == 5e-5
    _train_dpo(CompareConfig(model="tiny", dpo_pairs=24, dpo_settings={"beta": 0.5}), _Budget(1.0, 1, None), tqdm(disable=True))
    assert seen["config"] == DPOConfig(beta=0.5)  # the settings given replace the comparison's, nothing else
    with pytest.raises(ValueError, match=r"unknown DPOConfig field\(s\) \['lr'\]"):
        run_comparison(tmp_path / "out", methods="dpo", dpo_settings={"lr": 1e-5}, model="no-such-model")
    assert not (tmp_path / "out").exists()


def test_each_method_starts_from_the_starting_model_not_an_earlier_methods_policy():
    """Envs made by name share a live actor by default (shared_model=True): a second method
    built while the first one's trained actor is still referenced must not continue from it."""
    import torch
    from tqdm.auto import tqdm

    from rlhf_env.compare import CompareConfig, _Budget, _train_rl
    from rlhf_env.models import load_lm
    from rlhf_env.rewards import resolve_reward

    cfg = CompareConfig(model="tiny", max_new_tokens=8, seed=0)
    reward = resolve_reward("tiny")
    bar = tqdm(disable=True)
    start = load_lm("tiny")[0].state_dict()
    first, info = _train_rl("ppo", cfg, reward, _Budget(1e-9, 1, None), bar)  # one iteration
    assert any(not torch.equal(v, start[k]) for k, v in first[0].state_dict().items())  # it trained
    second, info2 = _train_rl("grpo", cfg, reward, _Budget(1e-9, 1, None), bar)
    assert second[0] is not first[0]
    # GRPO's actor after one update is one update away from the start, not from PPO's policy
    diff_start = sum(float((v - start[k]).abs().sum()) for k, v in second[0].state_dict().items())
    diff_first = sum(float((v - first[0].state_dict()[k]).abs().sum()) for k, v in second[0].state_dict().items())
    assert diff_start < diff_first
    info["_close"]()
    info2["_close"]()


def test_runs_with_the_same_settings_merge_and_others_are_refused(comparison, tmp_path):
    from rlhf_env.compare import merge_results, write_outputs

    _, result = comparison
    a = json.loads(json.dumps(result))
    b = json.loads(json.dumps(result))
    a["methods"] = {k: v for k, v in a["methods"].items() if k in ("dpo", "ppo")}
    b["methods"] = {k: v for k, v in b["methods"].items() if k in ("grpo", "rloo")}
    merged = merge_results([a, b])
    assert list(merged["methods"]) == list(METHODS)  # the usual order, whatever the runs' order
    assert merged["methods"] == result["methods"]
    write_outputs(merged, tmp_path)
    assert (tmp_path / "frontier.png").is_file() and "| rloo |" in (tmp_path / "compare.md").read_text()
    with pytest.raises(ValueError, match="more than one run"):
        merge_results([a, a])
    other = json.loads(json.dumps(b))
    other["settings"]["seed"] = 1
    with pytest.raises(ValueError, match="different settings"):
        merge_results([a, other])
    other = json.loads(json.dumps(b))
    other["reference"]["reward"] += 1.0
    with pytest.raises(ValueError, match="different reference"):
        merge_results([a, other])


def test_a_result_written_before_the_negative_share_was_kept_still_prints(comparison):
    from rlhf_env.compare import format_tables

    old = json.loads(json.dumps(comparison[1]))
    del old["reference"]["negative_share"]
    for m in old["methods"].values():
        del m["final"]["negative_share"]
    rows = [line.split(" | ") for line in format_tables(old).splitlines()[:6]]
    column = rows[0].index("VADER-negative share")
    assert [r[column] for r in rows[2:]] == ["—"] * 4
