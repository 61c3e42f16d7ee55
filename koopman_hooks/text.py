"""HuggingFace text classifiers built from configs (nothing is downloaded): BERT and GPT-2.

Both are the ``transformers`` library's own classes, only sized down, so probing them exercises
:class:`~koopman_hooks.probe.KoopmanProbe` on real third-party sequence models with dict
batches ``{"input_ids", "attention_mask", "labels"}``:

- :func:`bert_classifier`: ``BertForSequenceClassification``; probe ``bert.encoder.layer.*``
  (tokens ``(B, N, D)``). Its pooler reads token 0 of the last layer: ``reduce="cls"`` there.
- :func:`gpt2_classifier`: ``GPT2ForSequenceClassification``; probe ``transformer.h.*``. Its
  head scores every token and keeps each row's last non-padding one: ``reduce="last"``.

``transformers`` (the ``hf`` extra) is imported only when a model is built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from koopman_hooks.data.tokens import CLS, PAD


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("HuggingFace models need transformers: pip install 'koopman_hooks[hf]'") from err
    return transformers


def bert_classifier(num_classes: int, vocab_size: int = 16, hidden_size: int = 32, num_layers: int = 2,
                    num_heads: int = 2, intermediate_size: int = 64, max_positions: int = 64,
                    initializer_range: float = 0.1, dropout: float = 0.0) -> nn.Module:
    """A ``BertForSequenceClassification`` of the given size, randomly initialised."""
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions, num_labels=num_classes,
        initializer_range=initializer_range, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2_classifier(num_classes: int, vocab_size: int = 16, hidden_size: int = 32, num_layers: int = 2,
                    num_heads: int = 2, max_positions: int = 64, initializer_range: float = 0.1,
                    dropout: float = 0.0) -> nn.Module:
    """A ``GPT2ForSequenceClassification`` of the given size, randomly initialised (padding
    token ``PAD``, no key/value cache)."""
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
        num_labels=num_classes, initializer_range=initializer_range, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, pad_token_id=PAD, bos_token_id=CLS, eos_token_id=CLS, use_cache=False,
    )
    return transformers.GPT2ForSequenceClassification(config)
