"""Case: Hugging Face T5 encoder-decoder, whose attention bias indexes an embedding by
relative-position buckets built with in-place adds.

Scenario: `placer inspect` on a tiny T5ForConditionalGeneration (use_cache=False)
failed with "cannot time node 'embedding_1' (aten.embedding.default) on its own:
IndexError: index out of range in self": timing the bucket computation's `add_` alone,
again and again, grew the recorded bucket indices the embedding then read past its
32 rows. A node that may write its inputs is now timed on copies of them.
Source: new-user trial H11 (/tmp/h11/t5.py).
Model: transformers T5ForConditionalGeneration from a 1+1-layer config (the first layer of each
stack computes the buckets), random init,
dropout off, no cache.
"""
import importlib.util as _ilu, sys as _sys


def _torchvision_shim():
    """As in hf_gpt2_tied_lm_head.py: a CUDA-only torchvision wheel must not break the
    transformers import on a CPU-only torch."""
    if _ilu.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in _sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del _sys.modules[name]
        pkg = _ilu.module_from_spec(_ilu.find_spec("torchvision"))
        pkg.__version__ = "0.28.0"
        _sys.modules["torchvision"] = pkg


_torchvision_shim()

import torch
from transformers import T5Config, T5ForConditionalGeneration

VOCAB = 100


def build_model():
    torch.manual_seed(0)
    cfg = T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=32, d_kv=16, d_ff=64, vocab_size=VOCAB,
                   decoder_start_token_id=0, pad_token_id=0, use_cache=False, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg)


def example_inputs():
    """forward(input_ids, attention_mask, decoder_input_ids): (4, 12), (4, 12), (4, 8) int64."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    return ids, torch.ones(4, 12, dtype=torch.long), torch.randint(1, VOCAB, (4, 8), generator=g)


def loss_fn(output, input_ids, attention_mask, decoder_input_ids):
    return torch.nn.functional.cross_entropy(output.logits.reshape(-1, VOCAB), decoder_input_ids.reshape(-1))
