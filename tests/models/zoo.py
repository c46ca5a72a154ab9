"""The models under test: tiny configurations with random weights (nothing is downloaded)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.models.training_step import StepCase

NUM_CLASSES = 10
VOCAB = 100


def _labels(n: int, classes: int = NUM_CLASSES) -> torch.Tensor:
    return torch.arange(n) % classes


def _classification_loss(batch: int):
    labels = _labels(batch)
    return lambda logits: F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- vision

def resnet18() -> torch.nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=NUM_CLASSES).train()


def mobilenet_v3_small(*, dropout: bool = False) -> torch.nn.Module:
    """Train mode (BatchNorm statistics update); the classifier's Dropout in eval unless ``dropout``.

    reftrace's dropout masks come from its own RNG, so a step with dropout cannot be compared with
    eager torch element by element; ``test_dropout`` recovers the mask and replays it instead."""
    import torchvision
    model = torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES).train()
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    return model


def vision_transformer() -> torch.nn.Module:
    import torchvision
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES,
                                                dropout=0.0).train()


class UpsamplingNet(torch.nn.Module):
    """Conv2d, GroupNorm, ConvTranspose2d, nearest and bilinear Upsample, SiLU: a decoder-style net."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
            torch.nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1), torch.nn.SiLU(),  # 5 -> 10
            torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), torch.nn.GroupNorm(4, 4), torch.nn.SiLU(),  # 20
            torch.nn.Upsample(size=(27, 25), mode="nearest"),  # non-integer scales
            torch.nn.Conv2d(4, 2, 3, padding=1),
            torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),  # 54x50
            torch.nn.Upsample(size=(30, 30), mode="bilinear", align_corners=True))  # downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ----------------------------------------------------------------------------- sequence models

def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg).train()


def bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, use_cache=False)
    return BertForMaskedLM(cfg).train()


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      attention_dropout=0.0, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).train()


def mixtral() -> torch.nn.Module:
    """Mixture of experts: top-2 routing over 4 experts; transformers runs the experts through one grouped
    matrix product (``torch._grouped_mm`` in eager, its own ``transformers::grouped_mm_fallback`` op
    while compiling), with the tokens-per-expert offsets counted by ``torch.histc``."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        num_local_experts=4, num_experts_per_tok=2, attention_dropout=0.0, use_cache=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MixtralForCausalLM(cfg).train()


class EncoderClassifier(torch.nn.Module):
    """torch.nn.TransformerEncoder over embeddings, mean-pooled over unpadded positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, NUM_CLASSES)

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class LSTMClassifier(torch.nn.Module):
    """A 2-layer LSTM with a Linear head on the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def _no_args() -> tuple:
    return ()


def _padding_mask() -> torch.Tensor:
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 5:] = True  # the second sequence has 3 padding positions
    return mask


# Causal LM batch: the second sequence is left-padded by 3, so under the causal mask its first query
# rows attend to nothing (attention must give 0 there, not NaN); padded positions carry no label.
_LM_IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
_LM_MASK = torch.ones(2, 8, dtype=torch.long)
_LM_MASK[1, :3] = 0
_LM_LABELS = _LM_IDS.masked_fill(_LM_MASK == 0, -100)


def _lm_kwargs() -> dict:
    return {"input_ids": _LM_IDS, "attention_mask": _LM_MASK, "labels": _LM_LABELS}


def _lm_kwargs_without_labels() -> dict:
    return {"input_ids": _LM_IDS, "attention_mask": _LM_MASK}


def _mlm_kwargs() -> dict:
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]  # predict every third token; the rest is ignored by the loss
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _model_loss(out) -> torch.Tensor:
    return out.loss


def _next_token_loss(out) -> torch.Tensor:
    """Causal LM loss from the logits in the model's dtype (transformers' own loss upcasts to float32)."""
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), _LM_LABELS[:, 1:].reshape(-1), ignore_index=-100)


CASES: dict[str, StepCase] = {
    "resnet18": StepCase(resnet18, lambda: (torch.randn(2, 3, 64, 64),), _classification_loss(2)),
    "mobilenet_v3_small": StepCase(mobilenet_v3_small, lambda: (torch.randn(2, 3, 64, 64),),
                                   _classification_loss(2)),
    "vit": StepCase(vision_transformer, lambda: (torch.randn(2, 3, 32, 32),), _classification_loss(2)),
    "upsampling_net": StepCase(UpsamplingNet, lambda: (torch.randn(2, 3, 5, 5),),
                               lambda out: out.square().mean()),
    # transformers computes the labels= loss in float32 whatever the model's dtype: float64 runs use their own loss
    "gpt2": StepCase(gpt2, _no_args, _model_loss, make_kwargs=_lm_kwargs),
    "gpt2_logits_loss": StepCase(gpt2, _no_args, _next_token_loss, make_kwargs=_lm_kwargs_without_labels),
    "bert": StepCase(bert, _no_args, _model_loss, make_kwargs=_mlm_kwargs),
    "llama": StepCase(llama, _no_args, _model_loss, make_kwargs=_lm_kwargs),
    "mixtral": StepCase(mixtral, _no_args, _model_loss, make_kwargs=_lm_kwargs),
    "transformer_encoder": StepCase(EncoderClassifier, lambda: (_ids(), _padding_mask()), _classification_loss(2)),
    "lstm": StepCase(LSTMClassifier, lambda: (torch.randn(2, 5, 8),), _classification_loss(2)),
}
