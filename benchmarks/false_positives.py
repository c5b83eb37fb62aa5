"""What a model's wrong answers on the dev benchmark are: each false positive of the official protocol sorted into
one kind, per set, from the predictions of an earlier evaluate_dev row (no model runs).

    python benchmarks/evaluate_dev.py --sample 100 --models uniner-ner-135m --workdir /tmp/dev
    python benchmarks/false_positives.py --predictions /tmp/dev/row-0/predictions.jsonl [--empty person]

Kinds, first that applies: `other type`, a gold entity of the same sentence under another type (a band given for
`musical artist`); `overlap`, a string that holds or is held by a gold entity of the sentence (other bounds);
`not in text`, a string the sentence does not contain once both are normalized; `unlabelled`, the rest, text that
the gold marks as no entity. Then the ten most frequent `other type` pairs (gold type -> type asked). `--empty
TYPE` also prints the F1 each set would have if every question about TYPE on CrossNER were answered `[]`, which
bounds what fixing that one type could be worth. Same --sample and --seed as the evaluate_dev run. Needs
../shared/data beside the project.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from evaluate_dev import SHARED, ZERO_SHOT

from uniner import evaluate
from uniner.config import EvaluateConfig
from uniner.errors import UserError

KINDS = ["other type", "overlap", "not in text", "unlabelled"]


def kind_of(wrong: str, text: str, sentence_gold: dict[str, str]) -> str:
    if wrong in sentence_gold:
        return "other type"
    if any(wrong in gold or gold in wrong for gold in sentence_gold):
        return "overlap"
    return "not in text" if wrong not in evaluate.normalize(text) else "unlabelled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="predictions.jsonl of an evaluate_dev row.")
    parser.add_argument("--sample", type=int, default=100, help="Sentences per set, as in the evaluate_dev run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample, as in the evaluate_dev run.")
    parser.add_argument("--empty", default="", help="A type whose CrossNER answers to count as [] (a what-if).")
    args = parser.parse_args()
    if not Path(args.predictions).is_file():
        raise SystemExit(
            f"--predictions {args.predictions}: no such file; give an evaluate_dev row's predictions.jsonl"
        )
    config = EvaluateConfig(
        data=[str(SHARED / f) for f in ZERO_SHOT],
        predictions=args.predictions,
        sample_per_dataset=args.sample,
        seed=args.seed,
        output="unused",
    )
    datasets = evaluate.load_queries(config)
    try:
        answers, _ = evaluate.read_predictions(config, datasets)
    except UserError as error:  # a malformed line: one line, not a traceback
        raise SystemExit(f"false_positives: {error}") from None
    covered, total = evaluate.covered_queries(datasets, answers)
    if covered < total:
        raise SystemExit(
            f"false_positives: {args.predictions} answers {covered} of {total} queries: "
            "give the --sample and --seed of the evaluate_dev run that wrote it"
        )

    print("| set | predicted | right | " + " | ".join(KINDS) + f" | F1 | F1, {args.empty or 'no type'} answered [] |")
    print("| --- " * (len(KINDS) + 5) + "|")
    means, means_if_empty, confusions = [], [], Counter()
    for name, queries in datasets.items():
        gold_of_sentence: dict[str, dict[str, str]] = defaultdict(dict)  # text -> gold entity -> its type
        for query in queries:
            gold_of_sentence[query.text].update(dict.fromkeys(evaluate.official_items(query.gold), query.entity_type))
        kinds: Counter[str] = Counter()
        counts, counts_if_empty = evaluate.Counts(), evaluate.Counts()
        for query in queries:
            said = evaluate.official_items(evaluate.answer_text(answers[name, query.id]))
            truth = evaluate.official_items(query.gold)
            sentence_gold = gold_of_sentence[query.text]
            for wrong in set(said) - set(truth):
                kinds[kind_of(wrong, query.text, sentence_gold)] += 1
                if wrong in sentence_gold:
                    confusions[name, sentence_gold[wrong], query.entity_type] += 1
            counts.add(said, truth)
            emptied = query.entity_type == args.empty and name.endswith("-dev")
            counts_if_empty.add([] if emptied else said, truth)
        f1, f1_if_empty = 100 * counts.scores()["f1"], 100 * counts_if_empty.scores()["f1"]
        cells = [str(counts.predicted), str(counts.correct), *(str(kinds[k]) for k in KINDS), f"{f1:.1f}"]
        print(f"| {name} | " + " | ".join([*cells, f"{f1_if_empty:.1f}"]) + " |")
        means.append(f1)
        means_if_empty.append(f1_if_empty)
    print(
        f"zero-shot mean F1 {evaluate.mean_f1(means):.2f}, "
        f"with {args.empty or 'no type'} answered [] {evaluate.mean_f1(means_if_empty):.2f}"
    )
    print("\nthe most frequent `other type` answers (set: gold type -> type asked):")
    for (name, gold_type, asked), count in confusions.most_common(10):
        print(f"  {count:4d}  {name}: {gold_type} -> {asked}")


if __name__ == "__main__":
    main()
