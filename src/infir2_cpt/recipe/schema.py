"""The recipe schema: every section of a recipe is a dataclass here, every key a typed field with its default and
its help text (the `doc` metadata, which docs/recipes.md is generated from: scripts/gen_recipe_docs.py).

A new recipe key is one field here (and, when Megatron needs it, a flag in launch/megatron_args.py and a rule in
recipe/validate.py); loading, --set, `infir2 show` and the generated reference pick it up from the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

FP8_RECIPES = ("blockwise", "tensorwise", "delayed", "mxfp8")
WSD_DECAY_STYLES = ("cosine", "linear", "exponential", "minus_sqrt")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text in metadata."""
    return field(metadata={"doc": text}, **kwargs)


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    num_layers: int = doc("Transformer layers (Qwen2.5-7B: 28, 1.5B: 28).", default=28)
    hidden_size: int = doc("Hidden size (7B: 3584, 1.5B: 1536).", default=3584)
    ffn_hidden_size: int = doc("SwiGLU inner size (7B: 18944, 1.5B: 8960).", default=18944)
    num_attention_heads: int = doc("Query heads (7B: 28, 1.5B: 12).", default=28)
    num_query_groups: int = doc("Key/value heads for grouped-query attention (7B: 4, 1.5B: 2).", default=4)
    seq_length: int = doc("Training sequence length in tokens.", default=32768)
    max_position_embeddings: int = doc("RoPE table length; must be >= seq_length.", default=32768)
    untie_embeddings: bool = doc("Separate input embedding and output layer (7B: true, 1.5B: false).", default=True)
    rotary_base: int = doc("RoPE base (Qwen2.5: 1000000).", default=1000000)
    norm_epsilon: float = doc("RMSNorm epsilon.", default=1e-6)
    init_method_std: float = doc("Std of weight init (matters only when not starting from a checkpoint).", default=0.008)
    vocab_size: int = doc("Vocabulary size passed as --vocab-size (used by NullTokenizer; the HF tokenizer brings its own).", default=152064)
    padded_vocab_size: Optional[int] = doc(
        "Embedding rows. Set it to the converted checkpoint's embedding size so shapes match; "
        "null lets Megatron pad to a multiple of 128*TP.", default=None)
    attention_backend: str = doc("Megatron --attention-backend: auto, fused, flash, unfused, local.", default="auto")
    fused_qkv_rope: bool = doc("Apply RoPE to the fused QKV output in one kernel (Transformer Engine).", default=False)
    te_op_fuser: bool = doc(
        "Build each MLP with Transformer Engine's operation fuser (norm, FC1, SwiGLU, FC2 as one fusible sequence, "
        "so that Transformer Engine may fuse the quantization of a GEMM input into the kernel before it), over the "
        "same parameters. Both precisions; not with precision.fp8_activation_store or "
        "precision.fp8_activation_store_blockwise, and with parallel.overlap_param_gather: false. Its SwiGLU keeps "
        "a BF16 input for backward; docs/fp8.md has its cost and gain.",
        default=False)


@dataclass
class ParallelConfig:
    tensor_parallel: int = doc("Tensor-parallel size (must divide heads and query groups).", default=1)
    pipeline_parallel: int = doc("Pipeline-parallel size.", default=1)
    context_parallel: int = doc("Context-parallel size.", default=1)
    sequence_parallel: bool = doc("Sequence parallelism (needs tensor_parallel > 1).", default=False)
    distributed_optimizer: bool = doc("Shard optimizer state over data-parallel ranks.", default=True)
    overlap_grad_reduce: bool = doc("Overlap gradient reduce-scatter with backward.", default=True)
    overlap_param_gather: bool = doc("Overlap parameter all-gather with forward.", default=True)
    micro_batch_size: int = doc("Sequences per GPU per micro-step.", default=1)
    global_batch_size: int = doc("Sequences per optimizer step (all GPUs, all micro-steps).", default=128)
    distributed_timeout_minutes: int = doc("Collective timeout.", default=120)
    cross_entropy_fusion: Optional[str] = doc(
        "Fused cross-entropy: null (off), 'native' (Megatron's: two FP32 copies of the logits while the loss is "
        "computed, the FP32 softmax kept for backward) or 'lean' (infir2's: the same arithmetic in chunks, only the "
        "logits and two numbers per token kept, the gradient rebuilt in backward over the logits). 'te' is refused "
        "by megatron-core 0.19.2.", default=None)
    cuda_graph: Optional[str] = doc(
        "CUDA graphs: null (off), 'transformer_engine' (one graph per layer and micro-batch) or 'local'. "
        "Removes kernel-launch overhead where the step is host-bound (small models).", default=None)
    cuda_graph_modules: list[str] = doc(
        "With cuda_graph: the parts of a layer to capture (attn, mlp); empty captures whole layers.",
        default_factory=list)


@dataclass
class BlendEntry:
    path: str = doc("Indexed-dataset prefix: PREFIX.bin and PREFIX.idx must exist.", default="")
    weight: float = doc("Relative sampling weight.", default=1.0)


@dataclass
class DataConfig:
    mock: bool = doc("Use Megatron's MockGPTDataset (random-ish tokens) instead of files.", default=False)
    blend: list[BlendEntry] = doc("Indexed datasets (prefix of .bin/.idx) with weights.", default_factory=list)
    cache_dir: Optional[str] = doc(
        "Dataset index cache, shared by all ranks (default: exp/<name>/data_cache).", default=None)
    split: str = doc("train,valid,test split weights (unused with valid_blend).", default="90,5,5")
    valid_blend: list[BlendEntry] = doc(
        "Held-out indexed datasets for validation (and the default of `infir2 eval`). When set, Megatron trains "
        "on all of `blend` and validates on these (--train-data-path / --valid-data-path); `split` is not used "
        "and there is no test set. Empty: validation uses the `split` share of `blend`.", default_factory=list)
    num_workers: int = doc("DataLoader workers per rank.", default=6)


@dataclass
class TokenizerConfig:
    type: str = doc("Megatron tokenizer type: HuggingFaceTokenizer or NullTokenizer.", default="HuggingFaceTokenizer")
    model: Optional[str] = doc("HF tokenizer directory (for HuggingFaceTokenizer).", default=None)


@dataclass
class ScheduleConfig:
    train_iters: int = doc("Total optimizer steps (warmup + stable + decay).", default=40000)
    warmup_iters: int = doc("Linear warmup steps.", default=5000)
    decay_iters: int = doc("WSD decay (anneal) steps at the end of the run.", default=5000)
    decay_style: str = doc("WSD decay shape: cosine, linear, exponential, minus_sqrt.", default="cosine")
    lr: float = doc("Peak learning rate.", default=1e-4)
    min_lr: float = doc("Learning rate at the end of decay.", default=1e-5)
    warmup_init_lr: float = doc("Learning rate at step 0 of warmup.", default=0.0)
    weight_decay: float = doc("AdamW weight decay.", default=0.1)
    adam_beta1: float = doc("Adam beta1.", default=0.9)
    adam_beta2: float = doc("Adam beta2.", default=0.95)
    clip_grad: float = doc("Gradient-norm clipping.", default=1.0)
    seed: int = doc("Random seed (data order and init).", default=1236)


@dataclass
class PrecisionConfig:
    fp8: Optional[str] = doc("FP8 recipe: blockwise, tensorwise, delayed, mxfp8, or null for plain BF16.", default="blockwise")
    fp8_format: str = doc("FP8 format: e4m3 or hybrid (e4m3 forward, e5m2 gradients).", default="e4m3")
    fp8_param_gather: bool = doc("Keep parameters in FP8 and all-gather them in FP8.", default=True)
    precision_aware_optimizer: bool = doc("Transformer Engine's precision-aware fused Adam.", default=True)
    first_last_layers_bf16: bool = doc("Keep the first and last transformer layers in BF16.", default=False)
    fp8_output_layer: bool = doc(
        "Run the LM head's GEMMs (logits and both gradients) in FP8 with the run's recipe; its weight stays "
        "BF16 with an FP32 master unless fp8_output_layer_param. Untied embeddings only. Held BF16's loss within 0.1 % from a base model "
        "(docs/fp8.md). No effect in BF16 (noted at launch).", default=False)
    fp8_output_layer_param: bool = doc(
        "With fp8_output_layer and fp8_param_gather: the LM head's weight is an FP8 parameter, as the transformer "
        "layers' weights are, instead of a BF16 weight that Transformer Engine quantizes into two cached FP8 "
        "copies: 1.5 GiB less at 7B. Held BF16's loss within 0.11 % from a base model (docs/fp8.md). Elsewhere "
        "it has no effect (noted at launch).", default=False)
    fp8_attention: bool = doc(
        "Run core attention in FP8 (cuDNN fused attention, delayed scaling: E4M3 forward, E5M2 backward) inside "
        "the FP8 layers. Hopper or newer, head dim 128, sequence length a multiple of 128. Diverged in continual "
        "pre-training from a base model (docs/fp8.md): experimental.", default=False)
    fp8_attention_amax_history: int = doc(
        "With fp8_attention: over how many past steps each attention tensor's FP8 scale takes its largest absolute "
        "value (1: the last step's alone, as Transformer Engine's attention defaults to; more keeps headroom when "
        "values grow from one step to the next).", default=1)
    fp8_activation_store: bool = doc(
        "Keep the SwiGLU input (the widest activation) in FP8 for backward, quantized by Transformer Engine's "
        "SwiGLU with a per-tensor scale: saves memory, costs a little time.", default=False)
    fp8_activation_store_blockwise: bool = doc(
        "Keep the SwiGLU input in FP8 for backward with one scale per 128 values (the blockwise recipe's activation "
        "tiles; infir2's SwiGLU), instead of fp8_activation_store's one scale per tensor. Forward unchanged; "
        "backward reads the quantized copy, one compiled kernel each way on a GPU. About half the memory of that "
        "activation; held BF16's loss within 0.1 % from a base model (docs/fp8.md).", default=False)
    fp8_proj_bf16_input: bool = doc(
        "The attention output projection keeps its BF16 input for backward (attention keeps it anyway) instead "
        "of an extra FP8 copy: saves memory, changes no arithmetic. No effect in BF16 (noted at launch).",
        default=False)
    fp8_transpose_on_demand: bool = doc(
        "Keep only the row-wise FP8 copy of each weight between steps: backward rebuilds the transposed copy it "
        "needs (an exact FP8 transpose) and frees it once the weight's gradient is done. 1 byte per FP8 weight "
        "less, for one transpose per weight and micro-batch. Applies to blockwise FP8 parameters without CUDA "
        "graphs; elsewhere it has no effect (noted at launch).", default=False)
    fp8_bf16_param_remainders: bool = doc(
        "The parameters that stay BF16 in an FP8 run (embeddings, norms, biases, a BF16 LM head) keep their master as "
        "a BF16 run does: the BF16 parameter plus a 16-bit remainder in Transformer Engine's fused Adam, instead of "
        "a 4-byte FP32 copy. 2 bytes per such parameter less (divided by the data-parallel size), same masters. "
        "Applies to blockwise FP8 with fp8_param_gather, the precision-aware optimizer and the distributed "
        "optimizer; elsewhere it has no effect (noted at launch). Checkpoints store the remainders: a resume or a "
        "decay with the other setting is refused.", default=False)
    adam_moments: str = doc(
        "Dtype of Adam's two moments: fp32, or bf16 (as DeepSeek-V3 trains; 4 bytes per parameter less, needs "
        "precision_aware_optimizer). Applies in both precisions.", default="fp32")


@dataclass
class CheckpointConfig:
    save: bool = doc("Write checkpoints at all (false for throughput benchmarks: then not even Megatron's "
                     "final checkpoint is written).", default=True)
    save_interval: int = doc("Save a checkpoint every N iterations.", default=1000)
    keep_last: Optional[int] = doc(
        "Retention: keep the newest N complete checkpoints and remove older ones (after each new checkpoint, "
        "by the launcher; offline with `infir2 checkpoints EXP --prune`). null keeps every checkpoint. Never "
        "removed: partial ones, the newest complete one, the one the tracker names, decay sources and "
        "checkpoints being evaluated.", default=None)
    keep_every: Optional[int] = doc(
        "Retention: also keep every checkpoint whose iteration is a multiple of N (the branch points for "
        "`infir2 decay`); a multiple of save_interval. Needs keep_last.", default=None)
    format: str = doc("Megatron checkpoint format (torch_dist).", default="torch_dist")
    pretrained: Optional[str] = doc(
        "Base-model Megatron checkpoint directory (for example a converted Qwen2.5). Used only while the "
        "run's own checkpoint directory holds none.", default=None)
    load_rng: bool = doc("Restore RNG state on resume (the seed does not).", default=False)
    async_save: bool = doc("Write checkpoints in the background.", default=False)
    masters_from_pretrained: bool = doc(
        "First launch from `pretrained` with FP8 parameters: copy the optimizer's FP32 master weights from the "
        "checkpoint's BF16 weights (false: Megatron's default, rebuilt from the quantized FP8 parameters, i.e. "
        "the base model rounded to FP8).", default=True)


@dataclass
class LoggingConfig:
    log_interval: int = doc("Print metrics every N iterations.", default=1)
    eval_interval: int = doc("Evaluate every N iterations.", default=100)
    eval_iters: int = doc("Evaluation iterations per evaluation (0 disables).", default=10)
    tensorboard: bool = doc("Write TensorBoard events to exp/<name>/tensorboard.", default=True)
    wandb_project: Optional[str] = doc("W&B project (null disables W&B). Runs offline under exp/<name>/logs.", default=None)
    params_norm: bool = doc("Log the parameter norm.", default=True)
    num_zeros_in_grad: bool = doc("Log the number of zeros in gradients.", default=True)
    profile: bool = doc("PyTorch profiler + CUDA memory history (slow; the seed left it on).", default=False)
    profile_step_start: int = doc("First profiled step.", default=10)
    profile_step_end: int = doc("Last profiled step.", default=12)
    nan_check: str = doc(
        "Where NaN/Inf stop the run: 'micro_batch' (the loss of every micro-batch: one device sync each) or "
        "'step' (the reduced gradients, once per step).", default="micro_batch")


@dataclass
class LaunchConfig:
    nnodes: int = doc("Number of hosts; run the same command on each.", default=1)
    nproc_per_node: int = doc("GPUs (processes) per host.", default=8)
    rdzv_endpoint: str = doc("HOST:PORT of the c10d rendezvous (the first node).", default="localhost:29400")
    rdzv_id: Optional[str] = doc("Rendezvous job id (default: derived from the experiment name).", default=None)
    join_timeout: int = doc("Seconds to wait for all nodes to join the rendezvous.", default=900)
    exit_duration_minutes: Optional[int] = doc(
        "Wall-clock budget: save and exit cleanly after this many minutes (for batch schedulers).", default=None)
    max_restarts: int = doc("torchrun worker-group restarts on failure.", default=0)
    stop_grace_seconds: int = doc(
        "On SIGTERM/SIGINT the workers save a checkpoint and exit; they are killed only after this many seconds "
        "(the last resort: a save cut short leaves a partial checkpoint, which the next launch skips).",
        default=900)


@dataclass
class MegatronConfig:
    code_dir: Optional[str] = doc(
        "A Megatron-LM checkout; when set its pretrain_gpt.py is launched instead of infir2's entry.", default=None)


@dataclass
class Recipe:
    description: str = doc("One line shown by `infir2 recipes`.", default="")
    name: str = doc("Experiment name: outputs go to exp/<name>/.", default="run")
    phase: Literal["full", "decay"] = doc(
        "'full' runs warmup->stable->decay; 'decay' recipes start from a stable checkpoint (infir2 decay).",
        default="full")
    stable_name: Optional[str] = doc(
        "For decay recipes: the experiment whose checkpoints are annealed (default: the extended recipe's name).",
        default=None)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    env: dict[str, str] = doc("Environment for the run; a variable already set by the user wins.", default_factory=dict)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    megatron_extra_args: list[str] = doc(
        "Megatron flags appended last, verbatim (anything the schema does not model; last one wins).",
        default_factory=list)


def remainders_apply(recipe: Recipe) -> bool:
    """precision.fp8_bf16_param_remainders where megatron-core would keep FP32 masters for the BF16 parameters:
    blockwise FP8 parameters with the precision-aware, distributed optimizer."""
    p = recipe.precision
    return bool(p.fp8_bf16_param_remainders and p.fp8 == "blockwise" and p.fp8_param_gather
                and p.precision_aware_optimizer and recipe.parallel.distributed_optimizer)


def head_param_applies(recipe: Recipe) -> bool:
    """precision.fp8_output_layer_param where the head runs in FP8 among FP8 parameters."""
    p = recipe.precision
    return bool(p.fp8 and p.fp8_output_layer_param and p.fp8_output_layer and p.fp8_param_gather)
