"""Every candidate (prompt, answer) pair, per family, built from the shipped data sources: one
function per source or family, put together by ``candidate_examples`` (before the split and quotas)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from judge_training.families import DIAGNOSTIC_FAMILIES, FAMILIES, GOLD_LABEL, Example, family_rng
from judge_training.synth import (
    DEGENERATE_KINDS, FORMATS, GENERIC_REFUSALS, composed_refusal, degenerate_answer, reformat, repeat_prompt,
)

Pairs = list[tuple[str, str]]  # (prompt, answer)

# BeaverTails "unsafe" rows that open with a refusal or negation ("No, Islam is not a violent
# religion", "I'm sorry, ...") or contain counter-speech wording ("It is a stereotype ...", "is
# illegal", "should not") carry the QA pair's label but are often safe answers: they are left out
# of the positives and reported as the diagnostic diag_beavertails_ambiguous instead.
NEGATION_OPENING = re.compile(
    r"^\s*(no\b|i'?m sorry|i am sorry|sorry\b|i cannot|i can'?t|i can not|i won'?t|i will not|"
    r"i'?m not able|i am not able|i'?m unable|i am unable|as an ai\b|i do not|i don'?t)",
    re.I,
)
COUNTER_SPEECH = re.compile(
    r"\b(illegal|against the law|a crime|is wrong|it's wrong|not okay|not ok|never okay|never acceptable|"
    r"not acceptable|unacceptable|shouldn'?t|should not|should never|dangerous|harmful|not a good idea|"
    r"bad idea|i don'?t think|i wouldn'?t|please don'?t|stereotype|seek help|not appropriate|inappropriate|"
    r"disrespectful|i do not condone|don'?t condone|unethical|immoral|not true|is false|isn'?t true)\b",
    re.I,
)
# Refusal wording: splits safety_tuned_llamas outputs into "refusal" and "informative_safe".
REFUSAL_WORDING = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i can not|i won'?t|i will not|"
    r"i'?m not able|i am not able|i'?m unable|i am unable|as an ai\b|as a language model|"
    r"not appropriate|cannot (?:provide|assist|help|fulfill|comply|support))",
    re.I,
)
# hh-rlhf "chosen" answers are only the less harmful of two, so many still help with harm. An
# informative_safe example is a chosen final assistant turn that (a) differs from the rejected
# final turn, (b) has >= 8 words and (c) matches none of these compliance / harm-topic cues.
HH_UNSAFE_CUES = re.compile(
    r"\b(you can|you could|you might|you may want|you should|you'd|you would need|try|here'?s|"
    r"here are|here is|first,|step|steps|use|using|buy|get a|get some|the best way|one way|"
    r"easiest|recipe|ingredients|mix|how about|for example|such as|like this|sure|okay,|ok,|yes|"
    r"certainly|definitely|i'?d recommend|i recommend|i suggest|kill|murder|steal|rob|drug|drugs|"
    r"gun|guns|weapon|poison|poisoning|bomb|explosive|hack|racist|fuck|shit|bitch|sex|sexual|"
    r"heroin|cocaine|meth|overdose|knife|shoot|carbon monoxide|lie to|cheat|fire|burn|boil|boiling|"
    r"explosives?|rocks?|slaughter|smack|grab|ass|revenge|crime|insult|insults)\b|\bhuman:",
    re.I,
)

STOPWORDS = frozenset(
    "about after again also another because been before being between both could does doing down during each "
    "from further have having here into just like make more most much other over same should some such than "
    "that their them then there these they this those through under very what when where which while whom "
    "with would your yours you're what's how's i'm it's don't can't want know tell give write explain someone "
    "something people person best good ways create develop provide steps step compile list research analyze "
    "identify find investigate discuss outline generate describe detailed plan tips guide tutorial article "
    "post instructions information examples reasons".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9']+", text.lower()) if len(w) >= 4 and w not in STOPWORDS}


def nearest_prompts(queries: Sequence[str], candidates: Sequence[str], min_shared: int = 2) -> list[int | None]:
    """For each query, the index of the candidate sharing the most content words with it (ties: the
    lowest index), or None when fewer than ``min_shared`` words are shared, or when an earlier query
    already took that candidate (each candidate is used once). Pure Python, deterministic."""
    index: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        for w in content_words(c):
            index.setdefault(w, []).append(i)
    out: list[int | None] = []
    taken: set[int] = set()
    for q in queries:
        counts: Counter = Counter()
        for w in content_words(q):
            counts.update(index.get(w, ()))
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]), default=None)
        if best and best[1] >= min_shared and best[0] not in taken:
            taken.add(best[0])
            out.append(best[0])
        else:
            out.append(None)
    return out


def hh_final_turns(dialogue: str) -> tuple[str, str]:
    head, answer = dialogue.rsplit("\n\nAssistant:", 1)
    return head.rsplit("\n\nHuman:", 1)[-1].strip(), answer.strip()


def candidate_examples(src: dict[str, list[dict]], seed: int) -> dict[str, list[Example]]:
    """Every candidate pair, per family, before the split and the quotas."""
    out: dict[str, list[Example]] = {f: [] for f in FAMILIES + DIAGNOSTIC_FAMILIES}
    stl = instruction_pairs(src["stl"])
    alpaca = instruction_pairs(src["alpaca"])
    gsm = [(r["question"], r["answer"]) for r in src["gsm8k"]][:1000]
    bt_kept, bt_examples = split_beavertails(src["bt"])
    prompts = harmful_prompts(bt_kept, src["advbench"], stl, src["harmbench"])
    benign_answers = [a for _, a in alpaca] + [a for _, a in gsm]
    # in this order: it is the order of the pairs inside each family
    for examples in (
        bt_examples,
        harmful_format_examples(bt_kept, seed),
        stl_examples(stl),
        prompt_style_swaps(stl, bt_kept, src["advbench"]),
        refusal_examples(src["harmbench"], bt_kept, src["advbench"], seed),
        hh_informative_safe(src["hh"]),
        benign_task_examples(alpaca, gsm),
        off_topic_examples(prompts, benign_answers, seed),
        degenerate_examples(prompts, alpaca, bt_kept, seed),
        prompt_repeat_examples(prompts, seed),
        safe_formatted_examples(stl, alpaca, seed),
        advbench_opening_examples(src["advbench"]),
        gold_examples(src["gold"]),
    ):
        for e in examples:
            out[e.family].append(e)
    return out


def instruction_pairs(rows: list[dict]) -> Pairs:
    """(instruction, then its input if any, output) of Alpaca-style rows (safety_tuned_llamas, alpaca)."""
    return [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]) for r in rows]


def split_beavertails(rows: list[dict]) -> tuple[list[dict], list[Example]]:
    """BeaverTails unsafe rows: those kept as ``harmful`` (returned as rows too, for the other
    families) and the ambiguous ones (negation opening, counter-speech) as a diagnostic."""
    kept, examples = [], []
    for row in rows:
        if NEGATION_OPENING.search(row["response"]) or COUNTER_SPEECH.search(row["response"]):
            kind = "negation_opening" if NEGATION_OPENING.search(row["response"]) else "counter_speech"
            examples.append(Example(row["prompt"], row["response"], -1, "diag_beavertails_ambiguous", kind))
        else:
            kept.append(row)
            examples.append(Example(row["prompt"], row["response"], 1, "harmful", "beavertails"))
    return kept, examples


def harmful_format_examples(bt_kept: list[dict], seed: int) -> list[Example]:
    """Every kept BeaverTails response re-rendered in one format drawn at random."""
    rng = family_rng(seed, "harmful_format")
    out = []
    for row in bt_kept:
        fmt = rng.choice(FORMATS)
        out.append(
            Example(row["prompt"], reformat(row["response"], row["prompt"], fmt, rng), 1, "harmful_format", fmt)
        )
    return out


def stl_examples(stl: Pairs) -> list[Example]:
    """safety_tuned_llamas outputs: ``refusal`` when worded as one, ``informative_safe`` otherwise."""
    out = []
    for p, a in stl:
        fam = "refusal" if REFUSAL_WORDING.search(a) else "informative_safe"
        out.append(Example(p, a, 0, fam, "safety_tuned_llamas"))
    return out


def prompt_style_swaps(stl: Pairs, bt_kept: list[dict], advbench: list[dict]) -> list[Example]:
    """Prompt-style swaps, so the prompt's style (BeaverTails' chat questions vs the imperative
    instructions of safety_tuned_llamas / AdvBench / HarmBench) cannot stand in for the answer:

    (a) every safety_tuned_llamas refusal is also paired with the BeaverTails prompt sharing the most
        content words with its instruction (>= 2 shared; see nearest_prompts). A refusal stays a
        refusal under a related prompt; the non-refusal outputs are not swapped, because an answer to
        another question can read as compliance (tried: those pairs are ambiguous, not safe);
    (b) BeaverTails responses are paired with the instruction (every safety_tuned_llamas one, every
        AdvBench goal) sharing the most (>= 2) content words with their prompt.
    """
    out = []
    bt_prompts = [r["prompt"] for r in bt_kept]
    stl_refusals = [(p, a) for p, a in stl if REFUSAL_WORDING.search(a)]
    for (p, a), j in zip(stl_refusals, nearest_prompts([p for p, _ in stl_refusals], bt_prompts)):
        if j is not None:
            out.append(Example(bt_prompts[j], a, 0, "refusal", "stl_refusal_to_similar_chat_prompt"))
    instructions = [p for p, _ in stl] + [r["prompt"] for r in advbench]
    for p, j in zip(instructions, nearest_prompts(instructions, bt_prompts)):
        if j is not None:
            out.append(Example(p, bt_kept[j]["response"], 1, "harmful", "answer_to_similar_instruction"))
    return out


def refusal_examples(harmbench: list[dict], bt_kept: list[dict], advbench: list[dict], seed: int) -> list[Example]:
    """HarmBench's refusals; refusals (fixed or composed) to one BeaverTails prompt in four; fixed
    refusals to every other AdvBench goal."""
    out = [Example(row["prompt"], row["response"], 0, "refusal", "harmbench") for row in harmbench]
    rng = family_rng(seed, "refusal_generic")
    for row in bt_kept[::4]:
        if rng.random() < 0.4:
            out.append(Example(row["prompt"], rng.choice(GENERIC_REFUSALS), 0, "refusal", "generic"))
        else:
            out.append(Example(row["prompt"], composed_refusal(rng), 0, "refusal", "composed"))
    for row in advbench[::2]:
        out.append(Example(row["prompt"], rng.choice(GENERIC_REFUSALS), 0, "refusal", "generic"))
    return out


def hh_informative_safe(rows: list[dict]) -> list[Example]:
    """hh-rlhf chosen final turns that pass the ``HH_UNSAFE_CUES`` filter (see there)."""
    out = []
    for row in rows:
        p, a = hh_final_turns(row["chosen"])
        _, rejected = hh_final_turns(row["rejected"])
        if a != rejected and len(a.split()) >= 8 and not HH_UNSAFE_CUES.search(a):
            out.append(Example(p, a, 0, "informative_safe", "hh_rlhf_chosen"))
    return out


def benign_task_examples(alpaca: Pairs, gsm: Pairs) -> list[Example]:
    return ([Example(p, a, 0, "benign_task", "alpaca") for p, a in alpaca]
            + [Example(p, a, 0, "benign_task", "gsm8k") for p, a in gsm])


def harmful_prompts(bt_kept: list[dict], advbench: list[dict], stl: Pairs, harmbench: list[dict]) -> list[str]:
    """Harmful prompts for the prompt-conditioned negatives: BeaverTails, AdvBench, STL, HarmBench."""
    prompts = [r["prompt"] for r in bt_kept[1::3]] + [r["prompt"] for r in advbench]
    return prompts + [p for p, _ in stl[::3]] + [r["prompt"] for r in harmbench]


def off_topic_examples(prompts: list[str], benign_answers: list[str], seed: int) -> list[Example]:
    """Each harmful prompt answered with a benign answer (Alpaca or GSM8K) to another question."""
    rng = family_rng(seed, "off_topic")
    out = []
    for p in prompts:
        a = rng.choice(benign_answers)
        out.append(Example(p, a, 0, "off_topic", "gsm8k" if "####" in a else "alpaca"))
    return out


def degenerate_examples(prompts: list[str], alpaca: Pairs, bt_kept: list[dict], seed: int) -> list[Example]:
    """Each harmful prompt answered with a degenerate answer of a kind drawn at random."""
    rng = family_rng(seed, "degenerate")
    vocab = sorted({w.strip(string.punctuation).lower() for _, a in alpaca[:300] for w in a.split()} - {""})
    openings = [r["response"] for r in bt_kept[::7]] + [a for _, a in alpaca]
    out = []
    for p in prompts:
        kind = rng.choice(DEGENERATE_KINDS)
        out.append(Example(p, degenerate_answer(p, kind, rng, vocab, openings), 0, "degenerate", kind))
    return out


def prompt_repeat_examples(prompts: list[str], seed: int) -> list[Example]:
    """Each harmful prompt answered with itself, echoed in one of six ways."""
    rng = family_rng(seed, "prompt_repeat")
    out = []
    for p in prompts:
        a, kind = repeat_prompt(p, rng)
        out.append(Example(p, a, 0, "prompt_repeat", kind))
    return out


def safe_formatted_examples(stl: Pairs, alpaca: Pairs, seed: int) -> list[Example]:
    """Every other informative safety_tuned_llamas and Alpaca answer, re-rendered in a random format."""
    rng = family_rng(seed, "safe_formatted")
    informative_stl = [(p, a) for p, a in stl if not REFUSAL_WORDING.search(a)]
    out = []
    for p, a in informative_stl[::2] + alpaca[::2]:
        fmt = rng.choice(FORMATS)
        out.append(Example(p, reformat(a, p, fmt, rng), 0, "safe_formatted", fmt))
    return out


def advbench_opening_examples(advbench: list[dict]) -> list[Example]:
    """AdvBench goals with their affirmative target openings ("Sure, here is ..."): unlabelled."""
    return [Example(row["prompt"], row["target"], -1, "diag_advbench_opening") for row in advbench]


def gold_examples(rows: list[dict]) -> list[Example]:
    """The gold train part: each answer labelled harmful / not (``gold``) and, where it differs, its
    48-token cut with its own label (``gold_48``); borderline labels are left out."""
    out = []
    for row in rows:
        if row["part"] != "train":
            continue
        if row["label"] in GOLD_LABEL:
            out.append(Example(row["prompt"], row["answer"], GOLD_LABEL[row["label"]], "gold", row["kind"]))
        if row["label_48"] in GOLD_LABEL and row["answer_48"] != row["answer"]:
            out.append(Example(row["prompt"], row["answer_48"], GOLD_LABEL[row["label_48"]], "gold_48",
                               row["kind"] if row["label_48"] == row["label"] else "changed_at_48"))
    return out
