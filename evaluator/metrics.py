"""Text metrics on generated answers (no torch): BLEU/chrF with a bootstrap interval, repetition, refusals,
final-number accuracy, and identical-output detection across trials."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

REFUSAL_PATTERNS = re.compile(
    r"\b(i can(?:no|')t|i cannot|i won(?:')?t|i will not|i'm not able to|i am not able to|i'm unable to|"
    r"i am unable to|i must decline|i'm sorry|i am sorry|sorry, but|as an ai|not something i can help|"
    r"i can't help|i cannot help|i refuse|against (?:my|the) (?:guidelines|policy)|illegal and)\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def bleu_chrf(hypotheses: list[str], references: list[str], n_bootstrap: int = 1000) -> dict:
    """Corpus BLEU and chrF with sacrebleu signatures, each with a bootstrap percentile interval over prompts
    (the corpus score recomputed on each resample of prompts; rules in finesweep.stats)."""
    from sacrebleu.metrics import BLEU, CHRF

    from finesweep import stats

    if not hypotheses:
        return {"rows": 0}
    result = {"rows": len(hypotheses)}
    entry = {"kind": "text", "ids": [str(i) for i in range(len(hypotheses))],
             "values": [[h, r] for h, r in zip(hypotheses, references)]}
    for metric, scorer in (("bleu", BLEU()), ("chrf", CHRF())):
        # The plain corpus score (it also sets what the signature records, e.g. the number of references).
        result[metric] = round(scorer.corpus_score(hypotheses, [references]).score, 4)
        ci, method = stats.interval(stats.metric_rows(metric, entry), 0.95, n_bootstrap)
        result[f"{metric}_ci95"] = [round(ci[0], 4), round(ci[1], 4)]
        result[f"{metric}_signature"] = str(scorer.get_signature())
    result.update(bleu_interval=method, bleu_bootstrap_samples=n_bootstrap)
    return result


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same answer (0 = no loops)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# Characters that stand for an apostrophe in real text: models and people type "I’m sorry, I can’t" (U+2019,
# what most chat UIs and word processors produce) as often as "I'm sorry, I can't", and the patterns above are
# written with the ASCII one. Every one maps to "'" (one character for one, so text[:400] keeps its meaning).
APOSTROPHES = str.maketrans({c: "'" for c in (
    "\u2019",  # ’ right single quotation mark (the usual typographic apostrophe)
    "\u2018",  # ‘ left single quotation mark (autocorrect after a space, or a wrong-way apostrophe)
    "\u201b",  # ‛ single high-reversed-9 quotation mark
    "\u02bc",  # ʼ modifier letter apostrophe
    "\u02b9",  # ʹ modifier letter prime
    "\u2032",  # ′ prime
    "\u00b4",  # ´ acute accent
    "\u0060",  # ` grave accent
    "\uff07",  # ＇ fullwidth apostrophe
)})


def normalize_apostrophes(text: str) -> str:
    return text.translate(APOSTROPHES)


def is_refusal(text: str) -> bool:
    """Whether an answer declines (the refusal patterns within its first 400 characters), whatever character
    it writes its apostrophes with."""
    return bool(REFUSAL_PATTERNS.search(normalize_apostrophes(text[:400])))


def final_number(text: str) -> str | None:
    """The answer a math solution commits to: the first number after '####' if present, else the last one."""
    if "####" in text:
        numbers = _NUMBER.findall(text.split("####", 1)[1])[:1]
    else:
        numbers = _NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    try:
        value = float(numbers[0].replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def math_accuracy(answers: list[str], expected: list[str]) -> dict:
    hits = [final_number(a) == final_number(e) for a, e in zip(answers, expected)]
    return {"rows": len(hits), "math_accuracy": round(sum(hits) / len(hits), 4) if hits else None}


def output_fingerprint(answers: list[str]) -> str:
    return hashlib.sha256("\x1e".join(answers).encode()).hexdigest()[:16]


def identical_groups(fingerprints: dict[str, dict[str, str] | str]) -> list[list[str]]:
    """Groups (of two or more names) whose outputs are byte-identical on every eval set: `fingerprints` maps a
    name to {set name: fingerprint} (or to one fingerprint). Two trials that differ on any set are not
    identical, and a set one of them lacks counts as a difference."""
    groups = defaultdict(list)
    for name, fp in fingerprints.items():
        key = tuple(sorted(fp.items())) if isinstance(fp, dict) else fp
        groups[key].append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]
