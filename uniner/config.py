"""Typed settings: one dataclass per stage, every field with a one-line help and a default.

The same settings load from YAML (a mapping of field names) and from the command line (`--field-name VALUE`);
the command line wins. `load_config` does both and checks every value against its field's type.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from uniner.errors import UserError

BASE_MODEL = "smollm2-135m-instruct"  # what training starts from
STUDENT_MODEL = "uniner-ner-135m"  # the distilled NER student that extract and evaluate run by default


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class StageConfig:
    """Settings every stage shares."""

    s3_endpoint_url: str = setting(
        "", "S3-compatible endpoint for s3:// locations; empty: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS."
    )
    overwrite: bool = setting(False, "Replace an existing output instead of stopping with an error.")
    # The settings that name what the stage reads; `model` counts only where it is a folder or s3:// prefix.
    reads: ClassVar[tuple[str, ...]] = ("input",)

    def check(self) -> None:
        """Raise UserError for settings that cannot work together; subclasses add their own rules."""

    def locate(self, uri: str):
        """A local path or s3:// URI of this stage's settings as a storage Location, on this stage's S3 endpoint."""
        from uniner import storage

        return storage.locate(uri, s3_endpoint_url=self.s3_endpoint_url)

    def check_output_apart(self) -> None:
        """Refuse an output that is, contains or lies inside an input: emptying it would delete what the stage
        reads, and its parts would mix with the input's."""
        from uniner import storage

        output = getattr(self, "output", "")
        for name in self.reads:
            value = getattr(self, name)
            for source in value if isinstance(value, list) else [value]:
                if not output or not source or (name == "model" and not _is_location(source)):
                    continue
                relation = storage.overlap(output, source)
                if relation:
                    flag = name.replace("_", "-")
                    raise UserError(
                        f"--output {output} {relation} the --{flag} {source}: writing it would delete or "
                        "mix into what this stage reads; choose an output folder apart from the inputs"
                    )


def _is_location(spec: str) -> bool:
    return spec.startswith("s3://") or Path(spec).expanduser().exists()


def _require(value: str, flag: str, what: str) -> None:
    if not value:
        raise UserError(f"missing --{flag}: give {what}")


@dataclass(kw_only=True)
class PassagesConfig(StageConfig):
    """`uniner passages`: documents -> passages of at most `max_tokens` student tokens, deduplicated and sampled."""

    input: str = setting(
        "", "Documents: a file, directory or glob of .jsonl/.parquet/.txt (optionally .gz/.zst), local or s3://."
    )
    output: str = setting(
        "", "Output directory (local or s3://): passages as Parquet, plus _rejects/ and _summary.json."
    )
    input_format: str = setting("auto", "Document format: auto (from the file extension), jsonl, parquet or txt.")
    text_field: str = setting("text", "Field holding the document text in JSONL and Parquet input.")
    id_field: str = setting("", "Field holding a document id; empty: the file path plus line or row number.")
    tokenizer: str = setting(BASE_MODEL, "Model spec whose tokenizer counts tokens (the student's).")
    max_tokens: int = setting(256, "Upper bound on the tokens of one passage.")
    min_tokens: int = setting(8, "Passages with fewer tokens are dropped as too short.")
    dedup: bool = setting(True, "Drop passages whose normalized text repeats an earlier one.")
    sample_size: int = setting(0, "Keep this many passages, sampled deterministically from the seed; 0 keeps all.")
    seed: int = setting(0, "Seed of the sampling.")
    num_workers: int = setting(0, "Parallel reader/chunker actors; 0: one per CPU of the Ray cluster.")

    def check(self) -> None:
        _require(self.input, "input", "the documents to read (a path, glob or s3:// URI)")
        _require(self.output, "output", "the directory to write passages to (a path or s3:// URI)")
        if self.input_format not in ("auto", "jsonl", "parquet", "txt"):
            raise UserError(f"unknown --input-format {self.input_format!r}: use auto, jsonl, parquet or txt")
        if self.max_tokens < 8:
            raise UserError(f"--max-tokens {self.max_tokens} is too small: use at least 8")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise UserError(f"--min-tokens must lie between 0 and --max-tokens ({self.max_tokens})")
        if self.sample_size < 0 or self.num_workers < 0:
            raise UserError("--sample-size and --num-workers cannot be negative")


@dataclass(kw_only=True)
class AnnotateConfig(StageConfig):
    """`uniner annotate`: passages -> (entity, type) labels from a teacher LLM behind an OpenAI-compatible API."""

    input: str = setting("", "Passages from `uniner passages` (directory of Parquet, local or s3://).")
    output: str = setting(
        "", "Output directory for the annotations (local or s3://); rerunning the same command resumes it."
    )
    base_url: str = setting(
        "https://api.openai.com/v1", "Base URL of the OpenAI-compatible endpoint (OpenAI, a vLLM server, others)."
    )
    model: str = setting("gpt-3.5-turbo", "Teacher model name as the endpoint knows it.")
    api_key_env: str = setting(
        "OPENAI_API_KEY",
        "Environment variable that holds the API key (never logged or stored); when unset, a placeholder key is sent, "
        "which suits a local server that needs none.",
    )
    prompt_variant: str = setting("type", "Teacher prompt: type (entity types) or definition (short type definitions).")
    temperature: float = setting(0.0, "Sampling temperature of the teacher (0 as in the paper).")
    max_tokens: int = setting(1024, "Bound on the tokens of one teacher answer.")
    concurrency: int = setting(32, "Requests in flight per actor.")
    num_actors: int = setting(2, "Actors sending requests.")
    batch_size: int = setting(8, "Passages per Ray Data batch (an actor runs several batches at once).")
    requests_per_minute: int = setting(500, "Request rate limit for the whole job, over all actors and nodes.")
    tokens_per_minute: int = setting(
        200_000,
        "Token rate limit for the whole job; each request counts its prompt (chars/4) plus --max-tokens, "
        "as OpenAI does.",
    )
    max_retries: int = setting(
        6,
        "Retries of one request on 429, 5xx, timeouts and dropped connections "
        "(backoff with jitter, Retry-After honoured).",
    )
    timeout_s: float = setting(60.0, "Timeout of one request in seconds.")
    cache: str = setting(
        "",
        "Response cache folder (local or s3://) keyed by model, prompt, sampling and passage; empty: the user cache "
        "(UNINER_CACHE_DIR or ~/.cache/uniner)/teacher-responses; off: no cache.",
    )
    price_input_per_mtok: float = setting(0.0, "Price of one million input tokens, for the cost estimate.")
    price_output_per_mtok: float = setting(0.0, "Price of one million output tokens, for the cost estimate.")
    retry: list = setting(
        ["error"],
        "Statuses of stored passages that a rerun asks again, comma-separated (error, malformed, refused); "
        "the others are kept.",
    )

    def check(self) -> None:
        _require(self.input, "input", "the passages to annotate (output of `uniner passages`)")
        _require(self.output, "output", "the directory to write annotations to")
        unknown = set(self.retry) - {"error", "malformed", "refused"}
        if unknown:
            raise UserError(
                f"--retry {','.join(sorted(unknown))} is not a status a rerun can retry: "
                "use error, malformed or refused"
            )
        if self.prompt_variant not in ("type", "definition"):
            raise UserError(f"unknown --prompt-variant {self.prompt_variant!r}: use type or definition")
        for name in (
            "max_tokens",
            "concurrency",
            "num_actors",
            "batch_size",
            "requests_per_minute",
            "tokens_per_minute",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.temperature < 0:
            raise UserError("--max-retries and --temperature cannot be negative, and --timeout-s must be positive")
        if self.price_input_per_mtok < 0 or self.price_output_per_mtok < 0:
            raise UserError("--price-input-per-mtok and --price-output-per-mtok cannot be negative")


@dataclass(kw_only=True)
class BuildDataConfig(StageConfig):
    """`uniner build-data`: annotations or labelled NER files -> UniNER conversations (Pile-NER train.json shape)."""

    input: list = setting(
        [],
        "Inputs, comma-separated, each annotations from `uniner annotate`, a train.json-shaped file, "
        "or BIO/CoNLL files (file, folder or glob); their records are concatenated.",
    )
    output: str = setting(
        "", "Output directory: conversations.json (or <dataset>.json evaluation queries) and _summary.json."
    )
    input_kind: str = setting("auto", "What the input is: auto, annotations, conversations or bio.")
    negatives_per_passage: int = setting(
        2, "Negative types per annotated passage, drawn by type frequency, answered []."
    )
    absent_types_per_passage: int = setting(
        0,
        "Conversation inputs: questions answered [] added to each record, for types other records name and this "
        "one neither asks nor visibly holds (uniform draws, seeded); 0 adds none.",
    )
    drop_entities_not_in_text: bool = setting(
        True, "Drop teacher entities that do not occur in their passage (counted)."
    )
    dataset_name: str = setting(
        "", "BIO inputs, supervised format: prefix each text with `Dataset: NAME`; empty for zero-shot use."
    )
    label_map: str = setting(
        "", "YAML/JSON file mapping BIO labels to natural-language types (null drops one); empty: built-in maps."
    )
    bio_column_order: str = setting(
        "auto", "Column order of BIO files: auto (from the first line), token-tag (CrossNER/CoNLL) or tag-token (MIT)."
    )
    eval_queries: bool = setting(False, "BIO input: write evaluation queries, one conversation per (sentence, type).")
    merge_type_variants: bool = setting(False, "Merge case and plural variants of a type, and report the merges.")
    input_shares: list = setting(
        [],
        "Share of each input's records to keep, in input order (a seeded sample, e.g. 1,0.2 keeps all of the "
        "first input and a fifth of the second); empty keeps everything.",
    )
    holdout: list = setting(
        [],
        "Evaluation or conversation files whose texts are held out: records with the same text are left out "
        "(counted), so that an evaluation on them stays unseen.",
    )
    type_forms: bool = setting(
        False,
        "Ask each type in a form people write: half the questions keep the type as given, the others get it "
        "Capitalised, in Title Case, in UPPER case or with underscores (seeded).",
    )
    lowercase_share: float = setting(
        0.0,
        "Share of records whose text and answers are lower-cased (seeded), as search queries and transcripts "
        "are written; 0 keeps the case.",
    )
    window_words: int = setting(
        0,
        "Cut each text at sentence ends into windows of at most this many words, one record per window, every "
        "question kept and each answer limited to the entities in its window; 0 keeps whole texts.",
    )
    seed: int = setting(0, "Seed of negative sampling, --input-shares, --type-forms and --lowercase-share.")

    def check(self) -> None:
        if not self.input:
            raise UserError("missing --input: give annotations, a conversations file or BIO files")
        if self.input_shares:
            try:
                self.input_shares = [float(share) for share in self.input_shares]
            except ValueError:
                raise UserError(f"--input-shares must be numbers between 0 and 1, got {self.input_shares}") from None
            if len(self.input_shares) != len(self.input) or not all(0 < share <= 1 for share in self.input_shares):
                raise UserError(
                    f"--input-shares needs one share in (0, 1] per input ({len(self.input)} inputs), "
                    f"got {self.input_shares}"
                )
        _require(self.output, "output", "where to write the conversations")
        if self.input_kind not in ("auto", "annotations", "conversations", "bio"):
            raise UserError(f"unknown --input-kind {self.input_kind!r}: use auto, annotations, conversations or bio")
        if self.bio_column_order not in ("auto", "token-tag", "tag-token"):
            raise UserError(f"unknown --bio-column-order {self.bio_column_order!r}: use auto, token-tag or tag-token")
        if self.negatives_per_passage < 0:
            raise UserError("--negatives-per-passage cannot be negative")
        if self.absent_types_per_passage < 0:
            raise UserError("--absent-types-per-passage cannot be negative")
        if self.window_words < 0:
            raise UserError("--window-words cannot be negative: give a number of words, or 0 to keep whole texts")
        if not 0 <= self.lowercase_share <= 1:
            raise UserError(f"--lowercase-share must be between 0 and 1, got {self.lowercase_share}")


@dataclass(kw_only=True)
class TrainConfig(StageConfig):
    """`uniner train`: instruction-tune the student on conversations with Ray Train."""

    reads: ClassVar[tuple[str, ...]] = ("data", "model")
    data: str = setting(
        "", "Conversations (Pile-NER train.json shape): a .json list, .jsonl or Parquet file or folder, local or s3://."
    )
    output: str = setting(
        "", "Output folder (local or s3://): the trained model in Hugging Face format, metrics.jsonl, checkpoints."
    )
    model: str = setting(BASE_MODEL, "Student model spec: built-in name, local folder, s3:// prefix or hub id.")
    num_workers: int = setting(1, "Ray Train workers (one process each; one GPU each with --use-gpu).")
    use_gpu: bool = setting(False, "Train on GPUs (one per worker).")
    cpus_per_worker: int = setting(1, "CPUs reserved for each worker.")
    epochs: float = setting(1.0, "Passes over the data (ignored when max_steps > 0).")
    max_steps: int = setting(0, "Optimizer steps; 0: derived from epochs.")
    batch_size: int = setting(4, "Conversations per worker per micro-batch.")
    grad_accum: int = setting(
        1, "Micro-batches per optimizer step; conversations per step = workers x batch size x this."
    )
    learning_rate: float = setting(2e-5, "Peak learning rate.")
    lr_schedule: str = setting("cosine", "Decay after warmup: cosine, linear or constant.")
    warmup_ratio: float = setting(0.04, "Share of steps with linear warmup before the decay.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0 turns clipping off.")
    max_length: int = setting(1024, "Longest tokenized conversation; longer ones are cut at a turn boundary.")
    length_window: int = setting(32, "Micro-batches whose conversations are sorted by length together (less padding).")
    pad_to_multiple: int = setting(
        32,
        "Micro-batch widths are rounded up to a multiple of this: on CPU a run of many distinct widths slows step by "
        "step, one of few widths keeps its speed (docs/benchmarks.md); 1 pads only to the longest conversation.",
    )
    precision: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, about a third more time."
    )
    fsdp: bool = setting(False, "Shard weights, gradients and optimizer state over the workers (FSDP) instead of DDP.")
    lora_rank: int = setting(0, "LoRA rank through peft (pip install 'uniner[lora]'); 0 trains all weights.")
    lora_alpha: int = setting(16, "LoRA scaling alpha.")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    checkpoint_every: int = setting(
        0, "Save a checkpoint every N steps (a killed run resumes from the last); 0: only at the end."
    )
    keep_checkpoints: int = setting(
        2, "Checkpoints kept in OUTPUT/_ray while the run goes on; older ones are deleted, and all once it ends."
    )
    max_failures: int = setting(3, "Restarts of the worker group from the last checkpoint after a worker fails.")
    seed: int = setting(0, "Seed of initialisation, data order and turn shuffling.")

    def check(self) -> None:
        _require(self.data, "data", "the conversations to train on")
        _require(self.output, "output", "where to write the trained model")
        for name in (
            "num_workers",
            "cpus_per_worker",
            "batch_size",
            "grad_accum",
            "length_window",
            "pad_to_multiple",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps < 0 or self.checkpoint_every < 0 or self.max_failures < 0 or self.lora_rank < 0:
            raise UserError("--max-steps, --checkpoint-every, --max-failures and --lora-rank cannot be negative")
        if self.max_steps == 0 and self.epochs <= 0:
            raise UserError("--epochs must be positive when --max-steps is 0")
        if self.learning_rate <= 0 or not 0 <= self.warmup_ratio < 1:
            raise UserError("--learning-rate must be positive and --warmup-ratio in [0, 1)")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"unknown --lr-schedule {self.lr_schedule!r}: use cosine, linear or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"unknown --precision {self.precision!r}: use auto, bf16 or fp32")
        if self.max_length < 16:
            raise UserError(f"--max-length {self.max_length} is too small: use at least 16")
        if self.fsdp and not self.use_gpu:
            raise UserError(
                "--fsdp needs GPUs (Ray Train's FSDP runs on CUDA): add --use-gpu, or drop --fsdp to train with DDP"
            )
        if self.fsdp and self.lora_rank:
            raise UserError("LoRA with FSDP is not supported: use --no-fsdp (DDP) with --lora-rank, or --lora-rank 0")


@dataclass(kw_only=True)
class ExtractConfig(StageConfig):
    """`uniner extract`: any entity types over a document lake with a UniNER-style model."""

    reads: ClassVar[tuple[str, ...]] = ("input", "model")
    input: str = setting("", "Documents, read like `uniner passages` input: a file, directory or glob, local or s3://.")
    output: str = setting(
        "", "Output directory (local or s3://): one row per document, plus _summary.json and _export/."
    )
    types: list = setting(
        [], "Entity types to extract, comma-separated; or @FILE (local or s3://) with one type per line."
    )
    model: str = setting(
        STUDENT_MODEL,
        "Model spec: built-in name (uniner-ner-135m, the built-in NER student), local folder, s3:// prefix or hub id.",
    )
    backend: str = setting("auto", "auto (vLLM where installed, else transformers), vllm or transformers.")
    input_format: str = setting("auto", "Document format: auto (from the file extension), jsonl, parquet or txt.")
    text_field: str = setting("text", "Field holding the document text in JSONL and Parquet input.")
    id_field: str = setting("", "Field holding a document id; empty: the file path plus line or row number.")
    # A UniNER student answers a sentence or two far better than a long passage: 64 against 256 took the built-in
    # student's entity F1 on CrossNER documents from 31.2 to 39.2 and from 37.9 to 48.2 (benchmarks/, two runs).
    passage_tokens: int = setting(
        64, "Documents are split into passages of at most this many model tokens, at sentence ends where possible."
    )
    batch_size: int = setting(64, "Queries per engine call.")
    replicas: int = setting(1, "Engine actors.")
    gpus_per_replica: float = setting(0.0, "GPUs per engine actor (may be a fraction); 0 runs on CPU.")
    max_new_tokens: int = setting(256, "Bound on the tokens of one answer.")
    prefix_caching: bool = setting(True, "vLLM prefix cache: the queries of one passage share its prompt prefix.")
    case_sensitive: bool = setting(True, "Match answer strings to the text case-sensitively.")
    offsets: str = setting("words", "Where answer strings may match: words (not inside a longer word) or anywhere.")
    output_format: str = setting("parquet", "parquet or jsonl.")
    export: list = setting(
        [],
        "Also write OUTPUT/_export/ in these formats, comma-separated: conll, spacy, gliner, html (a page to look "
        "at: 200 documents, those with entities first, with their entities highlighted, a legend, "
        "and counts per type over all).",
    )

    def check(self) -> None:
        _require(self.input, "input", "the documents to extract from")
        _require(self.output, "output", "where to write extractions")
        if not self.types:
            raise UserError("missing --types: give entity types, e.g. --types person,location or --types @types.txt")
        choices = {
            "backend": ("auto", "vllm", "transformers"),
            "offsets": ("words", "anywhere"),
            "output_format": ("parquet", "jsonl"),
            "input_format": ("auto", "jsonl", "parquet", "txt"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}: use {', '.join(allowed)}")
        unknown = [e for e in self.export if e not in ("conll", "spacy", "gliner", "html")]
        if unknown:
            raise UserError(f"unknown --export {', '.join(unknown)}: use conll, spacy, gliner or html")
        if min(self.batch_size, self.replicas, self.max_new_tokens) < 1 or self.gpus_per_replica < 0:
            raise UserError(
                "--batch-size, --replicas and --max-new-tokens must be at least 1, --gpus-per-replica at least 0"
            )
        if self.passage_tokens < 8:
            raise UserError(f"--passage-tokens {self.passage_tokens} is too small: use at least 8")


@dataclass(kw_only=True)
class EvaluateConfig(StageConfig):
    """`uniner evaluate`: official UniNER F1 per dataset, with our span F1 beside it."""

    reads: ClassVar[tuple[str, ...]] = ("data", "predictions", "model")
    data: list = setting([], "Evaluation files, comma-separated: UniNER evaluation JSON/JSONL, or BIO/CoNLL files.")
    output: str = setting(
        "", "Report directory: report.json, report.md, report.png (and predictions.jsonl when a model runs)."
    )
    model: str = setting(
        "", f"Model spec to run; empty: the built-in student {STUDENT_MODEL}, unless --predictions is given."
    )
    predictions: str = setting(
        "", "JSONL of {id, output} (plus dataset where ids repeat) to score instead of running a model."
    )
    baseline: str = setting(
        "",
        "A second model spec run on the same queries and reported beside the first "
        "(the model training started from, say); empty: none.",
    )
    allow_missing: bool = setting(
        False,
        "Score --predictions that leave queries unanswered, each counted as an empty answer; the report states "
        "the coverage. Without it, such predictions are refused.",
    )
    sample_per_dataset: int = setting(
        0, "Evaluate a fixed seeded sample of this many records (BIO: sentences) per file; 0: all."
    )
    seed: int = setting(0, "Seed of the sample.")
    label_map: str = setting(
        "", "BIO files: YAML/JSON mapping of labels to types (null drops one); empty: built-in maps."
    )
    bio_column_order: str = setting("auto", "BIO files: auto (from the first line), token-tag or tag-token.")
    backend: str = setting("auto", "Engine for --model: auto (vLLM where installed), vllm or transformers.")
    batch_size: int = setting(64, "Queries per engine batch.")
    replicas: int = setting(1, "Engine actors.")
    gpus_per_replica: float = setting(0.0, "GPUs per engine actor; 0 runs on CPU.")
    max_new_tokens: int = setting(
        256, "Bound on the tokens of one answer (256, as the official UniNER evaluation; a cut answer scores [])."
    )

    def check(self) -> None:
        if not self.data:
            raise UserError("missing --data: give one or more evaluation files")
        _require(self.output, "output", "the report directory")
        if self.model and self.predictions:
            raise UserError("give one of --model (run a model) or --predictions (score existing answers), not both")
        self.model = self.model or ("" if self.predictions else STUDENT_MODEL)
        if self.sample_per_dataset < 0:
            raise UserError("--sample-per-dataset cannot be negative")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the CLI and the pipeline run it."""

    config: type[StageConfig]
    module: str  # the module with plan(config) -> lines, run(config) -> summary and summary_lines(summary) -> lines
    resumes: bool  # a rerun keeps what its output already holds and does the rest
    sources: dict[str, str]  # in a pipeline: setting -> the stage (or the "corpus") whose output it reads by default


# The stages in pipeline order: the one table of them.
STAGES: dict[str, Stage] = {
    "passages": Stage(PassagesConfig, "uniner.passages", resumes=False, sources={"input": "corpus"}),
    "annotate": Stage(AnnotateConfig, "uniner.annotate", resumes=True, sources={"input": "passages"}),
    "build-data": Stage(BuildDataConfig, "uniner.build_data", resumes=False, sources={"input": "annotate"}),
    "train": Stage(TrainConfig, "uniner.train", resumes=True, sources={"data": "build-data"}),
    "extract": Stage(ExtractConfig, "uniner.extract", resumes=False, sources={"input": "corpus", "model": "train"}),
    "evaluate": Stage(EvaluateConfig, "uniner.evaluate", resumes=False, sources={"model": "train"}),
}
STAGE_ORDER = tuple(STAGES)


@dataclass(kw_only=True)
class PipelineConfig:
    """`uniner pipeline CONFIG.yaml`: several stages from one file, each stage's output the next one's input."""

    workdir: str = setting("uniner-out", "Directory (local or s3://) holding every stage's output by default.")
    stages: list = setting(
        list(STAGE_ORDER), "Stages to run, in this order (any of them may be left out): " + ", ".join(STAGE_ORDER) + "."
    )
    sample_corpus_docs: int = setting(
        0,
        "When > 0, write a sample corpus of this many documents to WORKDIR/corpus and read it as input: generated "
        "news-style documents, or with recorded_teacher the recorded Pile passages.",
    )
    s3_endpoint_url: str = setting("", "S3-compatible endpoint, passed to every stage that sets none itself.")
    stand_in_teacher: str = setting(
        "",
        "A model spec to serve with vLLM's OpenAI-compatible server as a STAND-IN teacher for annotate (a demo, "
        "not a real teacher); empty: annotate calls its own base_url.",
    )
    recorded_teacher: bool = setting(
        False,
        "Annotate with the teacher answers recorded with uniner's Pile-NER sample (gpt-3.5-turbo-0301, CC BY-NC "
        "4.0), replayed by a local endpoint: real labels offline; the sample corpus is then those passages.",
    )
    optional_stages: list = setting(
        [], "Stages skipped with a message, instead of failing, when an input file they need is missing."
    )

    def check(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage(s) {', '.join(unknown)} in stages: use {', '.join(STAGE_ORDER)}")
        positions = [STAGE_ORDER.index(s) for s in self.stages]
        if not positions or positions != sorted(set(positions)):
            raise UserError(f"stages must be listed once each, in the order {' -> '.join(STAGE_ORDER)}")
        if self.recorded_teacher and self.stand_in_teacher:
            raise UserError("recorded_teacher and stand_in_teacher both name annotate's teacher: keep one")


# ---- reading values from YAML and the command line ----


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _base_type(next(arg for arg in typing.get_args(hint) if arg is not type(None)))
    return typing.get_origin(hint) or hint


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> plain type (str, int, float, bool or list) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def coerce(value: Any, kind: Any, name: str, where: str) -> Any:
    """Check and convert one setting value; strings (from the command line) are parsed."""
    problem = f"setting {name!r} {where}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{problem}: expected true or false, got {value!r}")
    if kind is list:
        if isinstance(value, str) and value.strip().startswith("["):  # YAML's flow syntax: [a, b]
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(f"{problem}: {value!r} is not a list; write a,b or [a, b]") from None
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
            return [str(item) for item in value]
        raise UserError(f"{problem}: expected a list or a comma-separated string, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise UserError(f"{problem}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{problem}: expected an integer, got {value!r}") from None
    if kind is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{problem}: expected a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{problem}: expected a string, got {value!r}")
    raise TypeError(f"unsupported setting type {kind} for {name}")


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """Make a config from a mapping; unknown names and badly typed values raise UserError."""
    kinds = field_types(cls)
    known = ", ".join(name.replace("_", "-") for name in kinds)
    checked = {}
    for raw_name, value in values.items():
        name = str(raw_name).replace("-", "_")
        if name not in kinds:
            raise UserError(f"unknown setting {raw_name!r} {where}; known settings: {known}")
        checked[name] = coerce(value, kinds[name], name, where)
    return cls(**checked)


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local file, with one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"config file {path} is not valid YAML ({first_line}): fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


# Settings a stage cannot run without; their help says so instead of showing an empty default.
REQUIRED_WHEN_EMPTY = {"input", "output", "data"}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per config field, documented with the field's help and default. A true/false
    setting takes `--name`, `--no-name`, or `--name true|false` as in YAML."""
    for spec in dataclasses.fields(cls):
        kind = field_types(cls)[spec.name]
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        flag = "--" + spec.name.replace("_", "-")
        shown = ",".join(default) if isinstance(default, list) else default
        if shown != "":
            note = f" (default: {shown!r})"
        else:
            note = " (required)" if spec.name in REQUIRED_WHEN_EMPTY else ""
        help_text = spec.metadata["help"] + note
        if kind is bool:
            parser.add_argument(
                flag,
                dest=spec.name,
                nargs="?",
                const="true",
                default=argparse.SUPPRESS,
                metavar="true|false",
                help=help_text,
            )
            parser.add_argument(
                "--no-" + flag[2:],
                dest=spec.name,
                action="store_const",
                const="false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        else:
            parser.add_argument(
                flag, dest=spec.name, default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text
            )


def load_config(cls: type, *, yaml_path: str | None, overrides: dict[str, Any]) -> Any:
    """YAML settings (if any), then command-line overrides on top; the result is checked."""
    values = read_yaml(yaml_path) if yaml_path else {}
    merged = build_config(cls, values, f"in {yaml_path}" if yaml_path else "")
    if overrides:
        kinds = field_types(cls)
        for name, value in overrides.items():
            setattr(merged, name, coerce(value, kinds[name], name, "on the command line"))
    merged.check()
    merged.check_output_apart()
    return merged


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved settings as a plain mapping (for --dry-run and provenance files)."""
    return dataclasses.asdict(config)
