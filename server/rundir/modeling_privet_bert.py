"""A BERT sequence classifier that pools by masked mean, loadable without privet.

``privet export --merge`` copies this file into the exported folder (transformers' own custom-code
mechanism: ``auto_map`` in ``config.json``), so ``AutoModelForSequenceClassification`` and
``pipeline("text-classification", model=DIR, trust_remote_code=True)`` rebuild exactly the model
privet trained. Transformers' own BERT classifier pools with ``tanh(dense(CLS))`` and no stock
architecture pools BERT states by masked mean, and a LayerNorm stands between any extra layer and
the head, so the pooling cannot be folded into weights: custom code is the honest route.

This module must import nothing but torch and transformers: it runs inside the exported folder.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["PrivetBertConfig", "PrivetBertForSequenceClassification"]


class PrivetBertConfig(BertConfig):  # type: ignore[misc,no-untyped-call]
    """BERT's configuration under its own ``model_type``.

    A distinct type makes a loader without ``trust_remote_code=True`` stop with transformers' own
    error instead of silently building the CLS-pooled BERT classifier (different predictions).
    """

    model_type = "privet_bert"


class PrivetBertForSequenceClassification(BertPreTrainedModel):  # type: ignore[misc,no-untyped-call]
    """BERT encoder, masked mean over token states, dropout, linear head (privet's ``pooling = "mean"``)."""

    config_class = PrivetBertConfig

    def __init__(self, config: PrivetBertConfig) -> None:
        super().__init__(config)
        self.num_labels = int(config.num_labels or 2)
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = (
            config.classifier_dropout
            if config.classifier_dropout is not None
            else config.hidden_dropout_prob
        )
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(config.hidden_size, self.num_labels)
        self.post_init()  # type: ignore[no-untyped-call]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Logits from the mean of the token states where ``attention_mask`` is 1."""
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = torch.nn.functional.cross_entropy(
                    logits.view(-1, self.num_labels), labels.view(-1)
                )
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
