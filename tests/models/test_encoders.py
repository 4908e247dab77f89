"""The MiT weight loader (published SegFormer key names, every key consumed, shapes checked), the text
encoder's truncation/padding, and the GAN's one-step update split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.models.encoders import MIT_DROPPED_KEYS, MixVisionTransformer, WeightsMismatchError, load_mit_weights
from pipeline.models.heads import TranslationHead

#: names and shapes as they appear in the released ImageNet checkpoint mit_b0.pth (SegFormer's MiT-B0)
PUBLISHED_B0 = {
    "patch_embed1.proj.weight": (32, 3, 7, 7),
    "patch_embed1.norm.weight": (32,),
    "patch_embed2.proj.weight": (64, 32, 3, 3),
    "patch_embed4.proj.bias": (256,),
    "block1.0.norm1.weight": (32,),
    "block1.0.attn.q.weight": (32, 32),
    "block1.0.attn.q.bias": (32,),
    "block1.0.attn.kv.weight": (64, 32),
    "block1.0.attn.proj.weight": (32, 32),
    "block1.0.attn.sr.weight": (32, 32, 8, 8),
    "block1.0.attn.norm.weight": (32,),
    "block1.1.norm2.bias": (32,),
    "block1.0.mlp.fc1.weight": (128, 32),
    "block1.0.mlp.dwconv.dwconv.weight": (128, 1, 3, 3),
    "block1.0.mlp.fc2.weight": (32, 128),
    "block3.1.attn.sr.weight": (160, 160, 2, 2),
    "block4.1.mlp.fc2.weight": (256, 1024),
    "norm1.weight": (32,),
    "norm4.bias": (256,),
    "head.weight": (1000, 256),
    "head.bias": (1000,),
}


@pytest.fixture(scope="module")
def b0_shapes() -> dict[str, tuple[int, ...]]:
    """The published key set of mit_b0.pth: the encoder's keys + the ImageNet head, checked against PUBLISHED_B0."""
    shapes = {k: tuple(v.shape) for k, v in MixVisionTransformer("mit_b0").state_dict().items()}
    shapes |= {"head.weight": (1000, 256), "head.bias": (1000,)}
    for k, shape in PUBLISHED_B0.items():  # the encoder really uses the published names and shapes
        assert shapes.get(k) == shape, (k, shapes.get(k), shape)
    assert not any("attn.sr" in k for k in shapes if k.startswith("block4."))  # sr ratio 1 in stage 4
    return shapes


def synthetic_b0(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def b0_encoder() -> MixVisionTransformer:
    return MixVisionTransformer("mit_b0")


def test_mit_loader_consumes_every_key(b0_shapes):
    enc = MixVisionTransformer("mit_b0")
    state = synthetic_b0(b0_shapes)
    dropped = load_mit_weights(enc, state)
    assert dropped == sorted(MIT_DROPPED_KEYS)
    own = enc.state_dict()
    assert set(own) == set(state) - set(MIT_DROPPED_KEYS)
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    maps = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 160, 4, 4), (1, 256, 2, 2)]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda s: s.pop("block2.1.attn.kv.weight"), "missing [1]: block2.1.attn.kv.weight"),
        (lambda s: s.__setitem__("block9.0.attn.q.weight", torch.zeros(1)), "unexpected [1]: block9.0.attn.q.weight"),
        (lambda s: s.__setitem__("norm3.weight", torch.zeros(320)), "norm3.weight: file (320,) vs mit_b0 (160,)"),
    ],
)
def test_mit_loader_names_every_mismatch_and_copies_nothing(damage, named, b0_shapes, b0_encoder):
    enc = b0_encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    state = synthetic_b0(b0_shapes)
    damage(state)
    with pytest.raises(
        WeightsMismatchError,
        match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        load_mit_weights(enc, state)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())


def test_encoder_weights_from_a_local_file_reach_every_mit_encoder(tmp_path, b0_shapes):
    state = synthetic_b0(b0_shapes, seed=1)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    specs = [("rgb.png", (3, 32, 32), 8), ("depth.png", (1, 32, 32), 16), ("label.png", (32, 32), 8)]
    over = [
        "model.task=segmentation",
        "data.modalities=[rgb,depth,label]",
        "model.num_classes=3",
        "model.dim=16",
        "model.image_size=32",
        "model.tokens=16",
        "model.num_blocks=1",
        "model.lica_group=0",
        "model.encoder=mit_b0",
    ]
    model = build_model(load_config(None, over + [f"model.encoder_weights={path}"]), specs)
    for name in ("rgb", "depth"):
        w = model.encoders[name].encoder.patch_embed1.proj.weight
        assert torch.equal(w, state["patch_embed1.proj.weight"])
    with torch.no_grad():
        model.eval()
        b = {
            "rgb.png": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
            "depth.png": torch.randint(0, 5000, (2, 1, 32, 32)).to(torch.uint16),
        }
        assert model(b, mode="predict")["pred"].shape == (2, 32, 32)
    bad = dict(state)
    bad.pop("norm2.bias")
    torch.save(bad, path)
    single = [o.replace("[rgb,depth,label]", "[rgb,label]") for o in over]  # one MiT to build, not two
    with pytest.raises(ConfigError, match="missing.*norm2.bias"):  # the loader's error, as a config error
        build_model(load_config(None, single + [f"model.encoder_weights={path}"]), specs[::2])
    with pytest.raises(ConfigError, match="conv encoder trains from scratch"):
        build_model(load_config(None, over[:-1] + [f"model.encoder_weights={path}"]), specs)


@pytest.fixture(scope="module")
def text_encoder():
    from pipeline.models.text import TextEncoder

    return TextEncoder(tokens=8, dim=16)


def test_text_is_truncated_and_padded_with_an_explicit_mask(text_encoder):
    texts = ["hello world", "one two three four five six seven eight nine ten"]
    tokens, mask = text_encoder(texts)
    assert tokens.shape == (2, 8, 16) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 4 + [False] * 4  # [CLS] hello world [SEP] + 4 pads
    assert mask[1].all()  # truncated to 8 word pieces
    assert torch.equal(tokens[0, 4:], torch.zeros(4, 16))  # pads are exactly zero after the projection
    # padding never changes a real token: the same text at a longer padded length gives the same states
    from pipeline.models.text import TextEncoder

    longer = TextEncoder(tokens=16, dim=16)
    longer.proj.load_state_dict(text_encoder.proj.state_dict())
    t16, m16 = longer(texts[:1])
    assert m16[0].sum() == 4
    torch.testing.assert_close(t16[0, :4], tokens[0, :4], atol=1e-5, rtol=1e-4)
    text_encoder.train()
    assert not text_encoder.bert.training and text_encoder.proj.training  # frozen MiniLM: no dropout
    with pytest.raises(ValueError, match="list of strings"):
        text_encoder("not a list")


def test_gan_generator_term_never_trains_the_discriminator():
    torch.manual_seed(0)
    head = TranslationHead(8, 3, steps=1, gan_weight=1.0)
    pred = torch.rand(2, 3, 16, 16, requires_grad=True)
    target = torch.rand(2, 3, 16, 16)
    total, _, _ = head.loss(pred, target)
    total.backward()
    d_grads = {k: p.grad.clone() for k, p in head.discriminator.named_parameters()}
    head.zero_grad()
    real, fake = head.discriminator(target), head.discriminator(pred.detach())
    d_only = 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    )
    d_only.backward()
    for k, p in head.discriminator.named_parameters():
        torch.testing.assert_close(d_grads[k], p.grad)


def test_text_cache_returns_the_uncached_states(text_encoder):
    from pipeline.models.text import TextEncoder

    cached = TextEncoder(tokens=8, dim=16, cache=2)
    cached.proj.load_state_dict(text_encoder.proj.state_dict())
    texts = ["hello world", "a second plot", "hello world"]
    with torch.no_grad():
        torch.testing.assert_close(cached(texts)[0], text_encoder(texts)[0])
        torch.testing.assert_close(cached(["a third", "hello world"])[0], text_encoder(["a third", "hello world"])[0])
    assert list(cached._cache) == ["a third", "hello world"]  # least recently used ("a second plot") dropped
    with pytest.raises(ValueError, match="frozen"):
        TextEncoder(tokens=8, dim=16, trainable=True, cache=4)
