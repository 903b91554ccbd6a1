"""Generate the embedded default dataset: short customer-support messages labelled by intent.

Run ``python -m lorafit.data.generate`` to rewrite ``support_train.csv`` and ``support_eval.csv``
next to this file. The output is a pure function of the templates below and a fixed seed, so the
shipped files can be checked against a fresh generation (tests do).

``support_chat_train.jsonl`` / ``support_chat_eval.jsonl`` (the causal-lm task's embedded default) are
the same tickets as chat rows: the user turn asks for a fixed JSON shape, the assistant turn is
``{"intent": ..., "urgent": ...}`` (urgent: the ticket says "Urgent" or that it is asked again).

Why generated: the package must train offline with no download and no third-party data licence.
Why intents rather than sentiment: five string labels exercise the label-set handling, and the
messages share vocabulary across labels ("account", "order", "charge"), so a frozen encoder with a
fresh head starts near chance and the fine-tune has something to learn.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 2000
N_EVAL = 500

OPENERS = [
    "",
    "",
    "",
    "Hi, ",
    "Hello, ",
    "Hey team, ",
    "Good morning. ",
    "Quick question: ",
    "Sorry to bother you, ",
    "Hi there, ",
    "Urgent: ",
    "Hello support, ",
]
CLOSERS = [
    "",
    "",
    "",
    " Thanks.",
    " Thank you!",
    " Please help.",
    " Can you check?",
    " Any idea?",
    " This is the second time I ask.",
    " Regards, Sam.",
    " Cheers.",
]

SLOTS = {
    "item": [
        "blender",
        "laptop sleeve",
        "running shoes",
        "desk lamp",
        "phone case",
        "coffee grinder",
        "backpack",
        "wool scarf",
        "headphones",
        "yoga mat",
        "kettle",
        "monitor stand",
        "winter jacket",
        "board game",
    ],
    "amount": ["$12.99", "$40", "$7.50", "$129", "$89.90", "$15", "$230", "$3.20", "$64"],
    "days": ["two days", "a week", "ten days", "three weeks", "5 days", "a month"],
    "device": ["iPhone", "Android phone", "Windows laptop", "Mac", "tablet", "Chromebook"],
    "feature": [
        "the app",
        "the checkout page",
        "the website",
        "the search bar",
        "notifications",
        "the cart",
        "the order tracker",
        "dark mode",
    ],
    "carrier": ["the courier", "the delivery driver", "the post office", "UPS", "DHL"],
    "when": ["yesterday", "this morning", "last week", "on Monday", "twice today", "since the update"],
}

TEMPLATES = {
    "billing": [
        "I was charged {amount} twice for the same order.",
        "Why is there a charge of {amount} on my card {when}?",
        "My invoice shows {amount} but the {item} was on sale.",
        "Can I get a copy of the receipt for my {item}?",
        "The payment failed {when} but the money left my account.",
        "Please update the credit card used for my subscription.",
        "I was billed {amount} after cancelling my plan.",
        "Do you accept PayPal or only cards?",
        "The discount code did not apply and I paid {amount} too much.",
        "I need the VAT number on my invoice for the {item}.",
        "There is an unknown {amount} subscription fee on my statement.",
        "How do I switch from monthly to yearly billing?",
    ],
    "shipping": [
        "My {item} has not arrived after {days}.",
        "The tracking number for my {item} does not work.",
        "{carrier} says delivered but there is no {item} at my door.",
        "Can you ship the {item} to a different address?",
        "When will my order with the {item} be dispatched?",
        "The package was left with a neighbour {when} and I cannot find it.",
        "Do you deliver to Canada and how long does it take?",
        "Tracking has shown in transit for {days} now.",
        "Can I pick up the {item} at a store instead of delivery?",
        "{carrier} tried to deliver {when} while I was out, what now?",
        "Is express shipping available for the {item}?",
        "Half of my order arrived but the {item} is missing.",
    ],
    "returns": [
        "I want to return the {item}, it is too small.",
        "How do I send back a {item} that arrived broken?",
        "The {item} stopped working after {days}, can I get a refund?",
        "I still have not received my refund for the returned {item}.",
        "Can I exchange the {item} for another colour?",
        "Where do I print the return label for my {item}?",
        "The {item} is not what I ordered and I want my money back.",
        "Is the return window thirty days for the {item}?",
        "I dropped off the return {when}, when do I get the {amount} back?",
        "Can I return a gift without the receipt?",
        "The {item} smells odd, I would like to send it back.",
        "Do I pay for the return postage of the {item}?",
    ],
    "account": [
        "I forgot my password and the reset email never comes.",
        "How do I change the email address on my account?",
        "My account was locked {when} after too many attempts.",
        "Please delete my account and all my data.",
        "I cannot log in on my {device} anymore.",
        "Someone else seems to be using my account, I saw an order for a {item}.",
        "How do I turn on two-factor authentication?",
        "I want to merge my two accounts into one.",
        "The verification code is not arriving on my phone.",
        "Can I change the username on my profile?",
        "How do I unsubscribe from the marketing emails?",
        "My saved addresses disappeared from my profile {when}.",
    ],
    "technical": [
        "{feature} crashes on my {device} {when}.",
        "{feature} is very slow to load on my {device}.",
        "I get an error 500 when I open {feature}.",
        "The images do not show on {feature} on my {device}.",
        "{feature} freezes whenever I add a {item}.",
        "The app will not install on my {device}.",
        "{feature} logs me out every few minutes on my {device}.",
        "The page goes blank when I click buy for the {item}.",
        "Buttons on {feature} are not clickable on my {device}.",
        "{feature} shows the wrong language since {when}.",
        "Push notifications stopped working on my {device} {when}.",
        "{feature} keeps showing a spinning wheel forever.",
    ],
}


def _fill(template: str, rng: random.Random) -> str:
    values = {name: rng.choice(options) for name, options in SLOTS.items()}
    text = template.format(**values)
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    if opener and not text.startswith(("I ", "I'")):
        text = opener + text[0].lower() + text[1:]
    else:
        text = opener + text[0].upper() + text[1:]
    return text + closer


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list, list]:
    """Return (train_rows, eval_rows), each a list of (text, label), balanced over the labels.

    Three templates per label never appear in training; half of the eval rows use them, so the
    eval accuracy measures some generalisation to new phrasings, not only new slot values.
    Sentences are de-duplicated across both splits, so no eval text is seen in training.
    """
    rng = random.Random(seed)
    per_train, per_eval = n_train // len(TEMPLATES), n_eval // len(TEMPLATES)
    train, evaluation, seen = [], [], set()

    def draw(templates: list, n: int, out: list, label: str) -> None:
        made = 0
        while made < n:
            text = _fill(rng.choice(templates), rng)
            if text not in seen:
                seen.add(text)
                out.append((text, label))
                made += 1

    for label, templates in TEMPLATES.items():
        order = list(templates)
        rng.shuffle(order)
        held_out, used = order[:3], order[3:]
        draw(used, per_train, train, label)
        draw(held_out, per_eval // 2, evaluation, label)
        draw(used, per_eval - per_eval // 2, evaluation, label)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def to_csv(rows: list) -> str:
    """Render rows as CSV text (header ``text,label``; quoting as Python's csv module does)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buf.getvalue()


N_CHAT_TRAIN, N_CHAT_EVAL = 600, 100
CHAT_INSTRUCTION = ("Read the customer support ticket below and reply with JSON only, in the form "
                    '{"intent": "<account|billing|returns|shipping|technical>", "urgent": <true|false>}.\n\n'
                    "Ticket: ")


def chat_answer(text: str, label: str) -> str:
    """The assistant's answer to one ticket (one line of JSON, keys in a fixed order)."""
    urgent = text.startswith("Urgent") or "second time" in text
    return json.dumps({"intent": label, "urgent": urgent})


def to_chat_jsonl(rows: list) -> str:
    """(text, label) rows -> jsonl of ``{"messages": [user, assistant]}`` rows."""
    lines = [json.dumps({"messages": [{"role": "user", "content": CHAT_INSTRUCTION + text},
                                      {"role": "assistant", "content": chat_answer(text, label)}]})
             for text, label in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    here = Path(__file__).resolve().parent
    train, evaluation = generate()
    (here / "support_train.csv").write_text(to_csv(train), encoding="utf-8")
    (here / "support_eval.csv").write_text(to_csv(evaluation), encoding="utf-8")
    (here / "support_chat_train.jsonl").write_text(to_chat_jsonl(train[:N_CHAT_TRAIN]), encoding="utf-8")
    (here / "support_chat_eval.jsonl").write_text(to_chat_jsonl(evaluation[:N_CHAT_EVAL]), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(evaluation)} eval rows to {here} (and the chat versions)")


if __name__ == "__main__":
    main()
