"""The seed's plain-torch model zoo (and a small MoE causal LM), small and seeded, shared by the
tests (``tests/test_zoo_models.py``) and the benchmarks (``benchmarks/engine_speed.py``).

Every builder takes ``seed`` and returns an eval-mode module; ``example_input`` helpers return
matching inputs. Sizes are chosen to keep a CPU test run short; the shapes of the layers follow
the seed (conv filters, LSTM units, block counts), the widths of the vision models are reduced.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD = 0


# --- text -------------------------------------------------------------------------------------

class TextCNN(nn.Module):
    """Embedding + 3x (Conv1d(128 filters) + ReLU + MaxPool1d) + global average + Linear."""

    def __init__(self, vocab: int = 200, dim: int = 32, filters: int = 128, classes: int = 3,
                 bias: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim if i == 0 else filters, filters, 3, padding=1, bias=bias) for i in range(3)
        )
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(filters, classes, bias=bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids).transpose(1, 2)  # (N, dim, T)
        for conv in self.convs:
            h = self.pool(torch.relu(conv(h)))
        return torch.softmax(self.fc(h.mean(-1)), -1)


class LSTMNextWord(nn.Module):
    """Embedding(64) + LSTM(100) + Dropout + Linear over the vocabulary at the last position."""

    def __init__(self, vocab: int = 120, dim: int = 64, hidden: int = 100, bias: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bias=bias)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(input_ids))
        return self.fc(self.dropout(out[:, -1]))


def token_batch(n: int = 3, t: int = 16, vocab: int = 120, pad_last: int = 5, seed: int = 0,
                left: bool = False) -> torch.Tensor:
    """Token ids in [1, vocab); sample 1 is padded (PAD) on ``pad_last`` positions (right, or
    left when ``left``: next-word models read the last position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    if n > 1 and pad_last:
        if left:
            ids[1, :pad_last] = PAD
        else:
            ids[1, -pad_last:] = PAD
    return ids


# --- vision -----------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class ResNet34(nn.Module):
    """ResNet-34 layout (BasicBlocks [3, 4, 6, 3], strides 1, 2, 2, 2) at a reduced width."""

    def __init__(self, width: int = 8, classes: int = 10, blocks=(3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            layers.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                                          for j in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _double_conv(cin: int, cout: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), nn.ReLU())


class UNet(nn.Module):
    """4 down (double conv + max pool), bridge, 4 up (ConvTranspose2d x2, skip concatenation,
    double conv), 1x1 conv + sigmoid: a per-pixel foreground probability."""

    def __init__(self, cin: int = 1, base: int = 4, bias: bool = True) -> None:
        super().__init__()
        ch = [base * 2 ** i for i in range(5)]
        self.downs = nn.ModuleList(_double_conv(cin if i == 0 else ch[i - 1], ch[i], bias) for i in range(4))
        self.pool = nn.MaxPool2d(2)
        self.bridge = _double_conv(ch[3], ch[4], bias)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2, bias=bias) for i in reversed(range(4)))
        self.up_convs = nn.ModuleList(_double_conv(2 * ch[i], ch[i], bias) for i in reversed(range(4)))
        self.head = nn.Conv2d(ch[0], 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge(x)
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = conv(torch.cat([up(x), skip], 1))
        return torch.sigmoid(self.head(x))


class BoxRegressor(nn.Module):
    """5 conv blocks (conv + ReLU + max pool), global average pool, Dense 512, 256, Dense 4 sigmoid."""

    def __init__(self, cin: int = 3, widths=(8, 16, 32, 32, 64), bias: bool = True) -> None:
        super().__init__()
        blocks, c = [], cin
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2)))
            c = w
        self.features = nn.Sequential(*blocks)
        self.dense1 = nn.Linear(c, 512, bias=bias)
        self.dense2 = nn.Linear(512, 256, bias=bias)
        self.box = nn.Linear(256, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3))
        h = torch.relu(self.dense2(torch.relu(self.dense1(h))))
        return torch.sigmoid(self.box(h))


def images(n: int = 2, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


def blob_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """One-channel images with a bright square (segmentation input)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, size, size, generator=g)
    for i in range(n):
        r, c = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, 0, r:r + size // 3, c:c + size // 3] += 1.0
    return x


def init_unet_foreground(model: UNet) -> UNet:
    """Shift the head's bias so a visible share of pixels is predicted foreground (p > 0.5)."""
    with torch.no_grad():
        if model.head.bias is not None:
            model.head.bias.fill_(0.05)
    return model


# --- mixture of experts -----------------------------------------------------------------------

def moe_causal_lm(seed: int = 0, vocab: int = 128, hidden: int = 32, layers: int = 2, experts: int = 4,
                  top_k: int = 2):
    """A tiny OLMoE causal LM (transformers, random weights): attention + sparse MoE blocks."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=256, use_cache=False, pad_token_id=PAD, eos_token_id=1, bos_token_id=2,
    )
    return OlmoeForCausalLM(cfg).eval()


def moe_block(seed: int = 0, hidden: int = 16, experts: int = 4, top_k: int = 2):
    """A standalone Mixtral sparse MoE block with random weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    blk = MixtralSparseMoeBlock(MixtralConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                              num_local_experts=experts, num_experts_per_tok=top_k))
    for p in blk.parameters():
        nn.init.normal_(p, std=0.3)
    return blk.eval()


def seeded(builder, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return builder(**kw).eval()
