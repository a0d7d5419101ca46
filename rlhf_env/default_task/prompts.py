"""The default task's prompts: templates x slots, hand-written so the set is reviewable and
stable, split into train and test by a seeded shuffle (``prompts_train.txt`` /
``prompts_test.txt`` under ``rlhf_env/assets``; rebuilt by
``python -m rlhf_env.default_task --prompts-only``).

The prompts are short review openings to continue, messages to reply to, everyday
questions and requests for advice.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from rlhf_env.default_task import ASSETS
from rlhf_env.agents.atomic import write_text

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (no torn file)."""
    write_text(path, text)


def write_prompts(assets: Path = ASSETS) -> tuple[list[str], list[str]]:
    """Write ``prompts_train.txt`` and ``prompts_test.txt`` (one prompt a line).

    :param assets: the folder to write into
    :return: ``(train, test)``
    """
    train, test = split_prompts(make_prompts())
    atomic_write_text(assets / "prompts_train.txt", "\n".join(train) + "\n")
    atomic_write_text(assets / "prompts_test.txt", "\n".join(test) + "\n")
    return train, test


