"""Compact students: a fine-tuned model stored as its base plus a compact difference.

Full fine-tuning moves every weight a little. `export` stores each weight matrix's difference from the base as the
fp16 factors of its top singular directions (`up @ down`) plus, by default, what they miss at one bit per weight
(signs and a scale per row); every other tensor (norm scales) is stored as it is. With `--calibration` (the
student's training conversations) those bits are fitted to what each layer outputs on the inputs it sees there
rather than weight by weight. `rebuild` adds them back onto the base. The student's config files travel in the
delta's metadata; its tokenizer must be the base's, which `export` checks. Several students of one base (checkpoints
of a run, or runs with other seeds) can be averaged weight by weight first: `average` writes their mean as a folder
(equal shares, or those of `--weights`), which `export` takes like any student. The base may be one of the students:
its share moves the mean back toward it (WiSE-FT's weight-space ensemble).
For the 135M student at rank 10 with the embedding's difference at rank 8, calibrated on 128 conversations of its
training data: 24.4 MB against 540 MB of fp32 weights, 0.8 and 0.2 points below those weights on two samples of the
dev benchmark (about 5 minutes on 2 cores; uncalibrated at rank 18 with the base's embedding, 1.0 below).

    python -m uniner.delta average --student uniner-out/cpu-student/train,uniner-out/seed1/train --output mean
    python -m uniner.delta export --student mean --base smollm2-135m-instruct --rank 10 --embedding-rank 8 \\
        --calibration ../shared/data/pile-ner-sample/pile_ner_type_sample.json \\
        --output uniner/data/students/uniner-ner-135m/delta.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def fingerprint(weights: dict[str, Any]) -> str:
    """A digest of a state dict (names and fp32 values), so that a delta is only ever added to its own base."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def low_rank(difference, rank: int):
    """fp16 factors (up: out x r, down: r x in) of the best rank-`rank` approximation of a matrix (truncated SVD)."""
    import torch

    u, s, vh = torch.linalg.svd(difference.to(torch.float32), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float16).contiguous(), (root[:, None] * vh[:rank]).to(
        torch.float16
    ).contiguous()


def signs_and_scales(residual, inputs=None):
    """The 1-bit form of a matrix: its signs packed 8 to a byte (uint8) and one fp16 scale per row.

    Without `inputs` the signs are the residual's and each scale the row's mean absolute value: the best per-row
    sign approximation weight by weight. With `inputs` (the mean outer product of the inputs the matrix sees, in x in),
    the form is fitted to what the layer outputs on them instead: the signs are chosen column by column, each
    column's error pushed onto the columns still to choose (GPTQ's error feedback, Frantar et al., 2022), and each
    row's scale is then the least-squares one on those inputs."""
    import numpy as np
    import torch

    if inputs is None:
        signs = residual > 0
        scales = residual.abs().mean(dim=1)
    else:
        signs = fed_back_signs(residual, inputs)
        values = signs.to(torch.float32) * 2 - 1
        scales = ((residual @ inputs) * values).sum(dim=1) / ((values @ inputs) * values).sum(dim=1)
    return torch.from_numpy(np.packbits(signs.numpy(), axis=1)), scales.to(torch.float16)


def fed_back_signs(residual, inputs, *, damping: float = 0.01):
    """The signs (True: +) of a one-bit form of `residual` that errs little on inputs with second moment `inputs`.
    Each row's scale is its mean absolute value while the signs are chosen; `damping` (a share of the mean input
    energy added to the diagonal) keeps the inverse stable where an input direction is never seen."""
    import torch

    columns = residual.shape[1]
    ridge = damping * float(inputs.diagonal().mean())
    moment = inputs.to(torch.float64) + ridge * torch.eye(columns, dtype=torch.float64)
    # Rows of the upper Cholesky factor of the inverse: how column j's error spreads onto the columns after it.
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(moment)), upper=True).to(torch.float32)
    work, scale = residual.clone(), residual.abs().mean(dim=1)
    signs = torch.empty_like(residual, dtype=torch.bool)
    for j in range(columns):
        signs[:, j] = work[:, j] >= 0
        error = (work[:, j] - torch.where(signs[:, j], scale, -scale)) / spread[j, j]
        work[:, j:] -= error[:, None] * spread[j, j:][None, :]
    return signs


def calibration_conversations_of(calibration: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` records of a JSON list of UniNER conversations; ValueError naming the file otherwise."""
    try:
        records = json.loads(calibration.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"--calibration {calibration}: {error}; give a JSON list of UniNER conversations") from None
    if not isinstance(records, list) or not records or not all(isinstance(record, dict) for record in records):
        raise ValueError(f"--calibration {calibration} is not a JSON list of UniNER conversations")
    return records[:count]


def input_moments(student: Path, records: list[dict[str, Any]], *, max_length: int = 512) -> dict[str, Any]:
    """The mean outer product x xT of the inputs of each of the student's linear layers (by weight name), over
    `records` (UniNER conversations: the student's training data) as the student itself runs them."""
    import torch

    from uniner.models import load_causal_lm
    from uniner.train_data import tokenized_conversations

    model, tokenizer = load_causal_lm(str(student))
    model.eval()
    conversations = tokenized_conversations(records, tokenizer, max_length=max_length)
    sums, counts = {}, {}

    def record_inputs(name: str):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record_inputs(f"{name}.weight"))
    with torch.no_grad():
        for conversation in conversations:
            model(torch.tensor([conversation.input_ids]))
    if not sums:
        raise ValueError(f"no calibration conversation of at most {max_length} tokens: give shorter ones")
    return {name: (sums[name] / counts[name]).to(torch.float32) for name in sums}


def from_signs(packed, scales, columns: int):
    """The matrix that signs_and_scales stored: +-scale per row."""
    import numpy as np
    import torch

    signs = torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=columns).astype(np.float32)) * 2 - 1
    return signs * scales.to(torch.float32)[:, None]


def normalized_shares(weights: list[float] | None, students: int) -> list[float]:
    """Each student's share of a mean, summing to 1: equal without `weights`, else `weights` normalized."""
    shares = [1.0] * students if weights is None else list(weights)
    if len(shares) != students or min(shares) <= 0:
        raise ValueError(f"{len(shares)} weights for {students} students: give one positive weight per student")
    return [share / sum(shares) for share in shares]


def averaged_weights(students: list[Path], weights: list[float] | None = None) -> dict[str, Any]:
    """The fp32 mean of several students' weights (a model soup), uniform unless `weights` gives each student's
    share (normalized to sum to 1: a mean of two runs weighted 2 beside a third run is the mean of all three). The
    students must share names and shapes."""
    import torch
    from safetensors.torch import load_file

    shares = normalized_shares(weights, len(students))
    total = {name: weight.to(torch.float32) * shares[0] for name, weight in load_file(students[0] / WEIGHTS).items()}
    for student, share in zip(students[1:], shares[1:]):
        tensors = load_file(student / WEIGHTS)
        if set(tensors) != set(total) or any(tensors[n].shape != total[n].shape for n in total):
            raise ValueError(f"{student} does not have the weights of {students[0]}: average students of one base")
        for name, weight in tensors.items():
            total[name] += weight.to(torch.float32) * share
    return total


def export(
    *,
    student: Path,
    base: Path,
    output: Path,
    rank: int = 8,
    embedding_rank: int = 8,
    residual_bits: int = 1,
    calibration: Path | None = None,
    calibration_conversations: int = 128,
) -> dict[str, Any]:
    """Write the delta of `student` from `base` (two Hugging Face folders) to `output`; returns its report: size,
    and the share of the difference's energy that the stored form keeps. With `residual_bits=1`, what the low-rank
    factors miss is stored as well, as signs and per-row scales (one bit per weight). With `calibration` (UniNER
    conversations, the student's training data), those signs and scales are fitted to the layers' outputs on the
    first `calibration_conversations` of them (see signs_and_scales), and the report adds `output_kept`: the share
    of the difference's effect on those inputs that the stored form keeps."""
    import torch
    from safetensors.torch import load_file, save_file

    if calibration is not None and not residual_bits:
        raise ValueError("--calibration fits the one-bit residual, which --residual-bits 0 leaves out: drop one")
    records = [] if calibration is None else calibration_conversations_of(calibration, calibration_conversations)
    for name in TOKENIZER_FILES:
        if (student / name).is_file() and (student / name).read_bytes() != (base / name).read_bytes():
            raise ValueError(f"{student / name} differs from the base's: a delta keeps the base tokenizer")
    tuned, original = load_file(student / WEIGHTS), load_file(base / WEIGHTS)
    if set(tuned) - set(original):
        raise ValueError(f"the student has weights the base lacks: {sorted(set(tuned) - set(original))[:3]}")
    moments = {}
    if calibration is not None:
        log.info(
            "Running the student on %d conversations of %s to see its layers' inputs...", len(records), calibration
        )
        moments = input_moments(student, records)
        log.info("Fitting the one-bit residual of %d matrices to those inputs...", len(set(moments) & set(tuned)))
    tensors, kept, total, output_missed, output_total = {}, 0.0, 0.0, 0.0, 0.0
    for name, weight in sorted(tuned.items()):
        difference = weight.to(torch.float32) - original[name].to(torch.float32)
        if "embed" in name and embedding_rank == 0:  # nothing stored: the rebuild keeps the base's embedding
            total += float(difference.square().sum())
            continue
        if weight.dim() == 2:
            up, down = low_rank(difference, embedding_rank if "embed" in name else rank)
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up, down
            residual = difference - up.float() @ down.float()
            if residual_bits:
                packed, scales = signs_and_scales(residual, moments.get(name))
                tensors[f"{name}.signs"], tensors[f"{name}.scales"] = packed, scales
                residual = residual - from_signs(packed, scales, residual.shape[1])
            kept += float(difference.square().sum() - residual.square().sum())
            if name in moments:
                output_missed += float(((residual @ moments[name]) * residual).sum())
                output_total += float(((difference @ moments[name]) * difference).sum())
        else:
            tensors[f"{name}.full"] = weight.to(torch.float32).contiguous()
            kept += float(difference.square().sum())
        total += float(difference.square().sum())
    metadata = {
        "base_fingerprint": fingerprint(original),
        "rank": str(rank),
        "embedding_rank": str(embedding_rank),
        "residual_bits": str(residual_bits),
        "calibration": f"{calibration.name}, {len(records)} conversations" if moments else "",
    }
    metadata.update({name: (student / name).read_text() for name in CONFIG_FILES if (student / name).is_file()})
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, output, metadata=metadata)
    report = {"output": str(output), "bytes": output.stat().st_size, "energy_kept": kept / total if total else 1.0}
    if output_total:
        report["output_kept"] = 1 - output_missed / output_total
    return report


def rebuild(*, base: Path, delta: Path, output: Path) -> None:
    """Write the student that `delta` describes, from `base`, as a Hugging Face folder at `output`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = load_file(base / WEIGHTS)
    with safe_open(delta, framework="pt") as stored:
        metadata = stored.metadata()
        if metadata["base_fingerprint"] != fingerprint(weights):
            raise ValueError(f"{delta} was made from another base than {base}")
        for key in stored.keys():
            name, part = key.rsplit(".", 1)
            if part == "full":
                weights[name] = stored.get_tensor(key)
            elif part == "up":
                change = stored.get_tensor(key).to(torch.float32) @ stored.get_tensor(f"{name}.down").to(torch.float32)
                if f"{name}.signs" in stored.keys():
                    change += from_signs(
                        stored.get_tensor(f"{name}.signs"), stored.get_tensor(f"{name}.scales"), change.shape[1]
                    )
                weights[name] = (weights[name].to(torch.float32) + change).contiguous()
    output.mkdir(parents=True, exist_ok=True)
    save_file(weights, output / WEIGHTS, metadata={"format": "pt"})
    copy_files(TOKENIZER_FILES, source=base, output=output)
    for name in CONFIG_FILES:
        if name in metadata:
            (output / name).write_text(metadata[name])


def average(*, students: list[Path], output: Path, weights: list[float] | None = None) -> None:
    """Write the mean of `students` (Hugging Face folders fine-tuned from one base) as a folder like the first,
    weighted by `weights` where given (see averaged_weights)."""
    from safetensors.torch import save_file

    merged = averaged_weights(students, weights)
    output.mkdir(parents=True, exist_ok=True)
    save_file(merged, output / WEIGHTS, metadata={"format": "pt"})
    copy_files(TOKENIZER_FILES + CONFIG_FILES, source=students[0], output=output)


def copy_files(names: tuple[str, ...], *, source: Path, output: Path) -> None:
    """Copy those of `names` that `source` holds into `output`."""
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, output / name)


def main() -> None:
    from uniner.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m uniner.delta", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write a student's delta from its base")
    out.add_argument("--student", required=True, help="the fine-tuned model: a model spec (folder, built-in name)")
    out.add_argument("--base", required=True, help="the model it was fine-tuned from: a model spec")
    out.add_argument("--output", required=True, help="the .safetensors file to write")
    out.add_argument("--rank", type=int, default=8, help="rank of each weight matrix's difference (default 8)")
    out.add_argument(
        "--embedding-rank",
        type=int,
        default=8,
        help="rank of the embedding's difference (default 8); 0 stores none of it: the rebuild keeps the base's",
    )
    out.add_argument(
        "--residual-bits",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: also store what the low-rank factors miss, one bit per weight; 0: factors only (default 1)",
    )
    out.add_argument(
        "--calibration",
        help="UniNER conversations (JSON, the student's training data): fit the one-bit residual to the layers' "
        "outputs on them rather than weight by weight (default: weight by weight)",
    )
    out.add_argument(
        "--calibration-conversations",
        type=int,
        default=128,
        help="how many of --calibration's conversations, from the first (default 128)",
    )
    back = commands.add_parser("rebuild", help="write the student a delta describes")
    back.add_argument("--base", required=True, help="the model spec the delta was made from")
    back.add_argument("--delta", required=True, help="the .safetensors delta")
    back.add_argument("--output", required=True, help="the folder to write")
    mean = commands.add_parser("average", help="write the weight-by-weight mean of students of one base")
    mean.add_argument(
        "--student",
        required=True,
        help="the fine-tuned models, comma-separated model specs; their base may be one, to pull the mean toward it",
    )
    mean.add_argument(
        "--weights",
        help="each student's share, comma-separated numbers in --student's order (default: equal shares)",
    )
    mean.add_argument("--output", required=True, help="the folder to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_command(args)
    except (ValueError, UserError) as error:  # a folder that doesn't fit: one line, not a traceback
        raise SystemExit(f"python -m uniner.delta {args.command}: {error}") from None


def run_command(args: argparse.Namespace) -> None:
    from uniner.models import resolve_model

    if args.command == "average":
        specs = [spec for spec in args.student.split(",") if spec]
        if len(specs) < 2:
            raise ValueError(
                f"--student {args.student!r} names {len(specs)} model(s): give two or more, separated by commas"
            )
        weights = None
        if args.weights:
            try:
                weights = [float(value) for value in args.weights.split(",")]
            except ValueError:
                raise ValueError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 2,1") from None
            normalized_shares(weights, len(specs))  # before resolving: a built-in student may need a fetch first
        average(students=[resolve_model(spec) for spec in specs], output=Path(args.output), weights=weights)
    elif args.command == "export":
        report = export(
            student=resolve_model(args.student),
            base=resolve_model(args.base),
            output=Path(args.output),
            rank=args.rank,
            embedding_rank=args.embedding_rank,
            residual_bits=args.residual_bits,
            calibration=Path(args.calibration) if args.calibration else None,
            calibration_conversations=args.calibration_conversations,
        )
        print(json.dumps(report, indent=2))
    else:
        rebuild(base=resolve_model(args.base), delta=Path(args.delta), output=Path(args.output))


if __name__ == "__main__":
    main()
