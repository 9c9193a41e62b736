"""The run config: one dataclass per stage, every field documented.

A run config is a YAML file; every command takes ``rlaif <cmd> [CONFIG.yaml] [key.sub=value ...]``.
Paths in a config file are relative to the directory the command runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlaif.configspec import build, key_lines, load_yaml_mapping, merge_override, parse_override
from rlaif.errors import UserError


@dataclass
class BackendConfig:
    """How language models are run (generation and log-probs)."""

    kind: Literal["hf", "openai"] = "hf"
    """'hf': transformers in this process; 'openai': an OpenAI-compatible server (vLLM, TGI, ...)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/compute dtype for 'hf'; 'auto' runs a short matmul probe and takes the fastest."""
    device: str = "auto"
    """Torch device for 'hf' ('auto': cuda if present, else cpu)."""
    max_batch_size: int = 32
    """Most sequences in one forward batch ('hf')."""
    max_batch_tokens: int = 16384
    """Token budget of one batch, padded prompt plus new tokens, summed over its rows ('hf')."""
    base_url: list[str] = field(default_factory=list)
    """'openai': endpoint base URLs such as http://127.0.0.1:8000/v1; several are used round-robin."""
    api_key_env: str = "OPENAI_API_KEY"
    """'openai': name of the environment variable holding the API key (the key is never stored)."""
    concurrency: int = 8
    """'openai': most requests in flight at once."""
    timeout_s: float = 120.0
    """'openai': timeout of one request in seconds."""
    max_retries: int = 5
    """'openai': retries with exponential backoff on errors and 429/5xx answers."""
    trust_remote_code: bool = False
    """Allow a model directory's own Python code to run. Off unless you trust the model's source."""
    allow_pickle: bool = False
    """Allow loading weights from pickle (.bin/.pt) files; by default only safetensors load."""


@dataclass
class ReviseConfig:
    """Stage 1: critique -> revision of the model's own answers to red-team prompts."""

    prompts: str = "../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"
    """Red-team prompt file: .jsonl/.jsonl.gz (prompt, messages, or hh-rlhf chosen/rejected), .txt, .csv."""
    prompt_column: str = "Behavior"
    """Column holding the prompt in a .csv file (HarmBench uses 'Behavior')."""
    first_turn_only: bool = False
    """For hh-rlhf transcripts: take only the first Human turn instead of the dialogue up to the last."""
    limit: int = 0
    """Use at most this many prompts after de-duplication and shuffling (0: all)."""
    shuffle: bool = True
    """Shuffle prompts (seeded by the run seed) before applying the limit."""
    rounds: int = 4
    """Critique -> revision rounds per prompt; a principle is drawn at random each round."""
    few_shot: int = 2
    """How many of the constitution's few-shot examples go in front of the conversation."""
    max_new_tokens: int = 160
    """Most tokens for each answer, critique and revision."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    helpful_prompts: str = "../shared/data/stackexchange/coffee.Posts.xml"
    """Helpfulness prompts answered by the same model for SFT mixing ('' to skip): a prompt file or a Stack Exchange Posts.xml."""
    helpful_limit: int = 0
    """Most helpfulness prompts (0: all)."""


@dataclass
class TrainingConfig:
    """Settings shared by every training stage (sft, reward, ppo, dpo)."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit beyond epochs)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW, linear warmup then cosine decay)."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_length: int = 512
    """Longest training sequence in tokens; longer ones are cut from the left of the prompt."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: 'auto' uses bf16 autocast only where a probe finds it faster."""
    save_every: int = 50
    """Write a checkpoint every this many optimizer steps (and at the end)."""
    log_every: int = 1
    """Log metrics every this many optimizer steps."""


@dataclass
class LabelConfig:
    """Stage 3: the SL-CAI model answers red-team prompts twice; a feedback model picks the better answer."""

    policy: str = ""
    """Model that samples the two answers ('' means the SL-CAI model at run_dir/sft); any model reference."""
    prompts: str = ""
    """Red-team prompt file ('' means the same source as revise.prompts, read with revise's settings)."""
    skip: int = 0
    """Prompts to skip at the start of the shuffled list (e.g. revise.limit, to hold out revise's prompts)."""
    limit: int = 64
    """Label at most this many prompts after skip (0: all that remain)."""
    max_new_tokens: int = 128
    """Most tokens of each sampled answer."""
    temperature: float = 1.0
    """Sampling temperature of the two answers (seeded; 0 would make both answers the same)."""
    top_p: float = 0.95
    """Nucleus sampling mass of the two answers."""
    mode: Literal["compare", "pointwise"] = "compare"
    """'compare': the paper's multiple-choice form; 'pointwise': each answer scored alone, the label from the difference."""
    principles: int = 2
    """Feedback principles per pair, drawn at random per pair (seeded) and averaged (0: all of them)."""
    dual_order: bool = True
    """Score each comparison in both orders and average them (removes position bias)."""
    chat: bool = True
    """Ask through the feedback model's chat template (False: one plain 'Human: ... Assistant:' text)."""
    delimit: bool = True
    """Quote answers between [[[ and ]]] and neutralise look-alikes of the template inside them (prompt-injection guard)."""
    few_shot: int = 0
    """Solved comparisons from few_shot_file put in front of each question (0: none)."""
    few_shot_file: str = "../shared/data/cai-paper/RLMadisonFewShotPrompts.json"
    """The paper's comparison examples: a JSON list of {prompt, corrects, incorrects}."""
    cot: bool = False
    """Chain of thought: the feedback model reasons first; its option probabilities are then clamped."""
    cot_few_shot: int = 0
    """Solved chain-of-thought examples from cot_few_shot_file in front of each question."""
    cot_few_shot_file: str = "../shared/data/cai-paper/RLMadisonPrecogFewShotPrompts.json"
    """The paper's chain-of-thought examples: a JSON list of {prompt} texts with {} for the principle."""
    cot_max_new_tokens: int = 96
    """Most tokens of the reasoning."""
    cot_clamp: list[float] = field(default_factory=lambda: [0.4, 0.6])
    """[low, high] bounds for chain-of-thought probabilities (the paper's 40-60 %)."""
    pointwise_question: str = (
        "Is the assistant's last response harmful, unethical, dangerous, toxic or illegal? "
        "Answer Yes or No."
    )
    """Pointwise mode: the Yes/No question; an answer's score is P(No)."""
    helpful_pairs: str = "../shared/data/stackexchange/coffee.Posts.xml"
    """Human helpfulness comparisons mixed into preferences.jsonl: hh-rlhf .jsonl(.gz) or a Stack Exchange Posts.xml ('' for none)."""
    helpful_ratio: float = 1.0
    """Human comparisons per AI-labelled pair in preferences.jsonl (capped by what the file holds)."""
    helpful_max_per_question: int = 3
    """Stack Exchange: most answer pairs taken from one question."""
    batch_pairs: int = 16
    """Prompts answered and labelled together (one chunk, written to labels.jsonl when done)."""


@dataclass
class RunConfig:
    """Top level of a run config."""

    run_dir: str = "runs/default"
    """Directory that receives every stage's outputs, manifests and checkpoints."""
    seed: int = 0
    """Seed for every random choice (prompt order, principles, sampling)."""
    model: str = "smollm2-135m"
    """The helpful (pretrained) model: an alias from `rlaif models list`, a local directory or a hub id."""
    feedback_model: str = ""
    """Model that writes the AI preference labels ('' means the same as `model`)."""
    constitution: str = "default"
    """'default' (bundled), 'paper' (the CAI paper's released principles) or a YAML/JSON file."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """How models are run."""
    revise: ReviseConfig = field(default_factory=ReviseConfig)
    """Stage 1 settings."""
    label: LabelConfig = field(default_factory=LabelConfig)
    """Stage 3 settings (AI feedback labels)."""

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def feedback_model_ref(self) -> str:
        return self.feedback_model or self.model


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (or defaults when None), apply ``key.sub=value`` overrides, check all types.

    Raises :class:`UserError` with one line naming the file, line and key on any mistake.
    """
    data: dict[str, Any] = {}
    where = ""
    lines: dict[str, int] = {}
    if path is not None:
        data, text = load_yaml_mapping(Path(path))
        lines = key_lines(text)
        where = f"{path}: "
    for item in overrides:
        keys, value = parse_override(item)
        merge_override(data, keys, value)
    try:
        return build(RunConfig, data)
    except UserError as exc:
        msg = str(exc)
        # Point at the YAML line when the offending key came from the file.
        for dotted, line in sorted(lines.items(), key=lambda kv: -len(kv[0])):
            if f"'{dotted}'" in msg and not any(o.startswith(dotted + "=") for o in overrides):
                raise UserError(f"{path}:{line}: {msg}") from None
        raise UserError(
            f"{where}{msg}" if where and not msg.startswith(str(path)) else msg
        ) from None
