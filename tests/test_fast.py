"""The real-time step (vla.fast) against the plain model path: exact where it must be, bounded where
it approximates (token reuse, FastV pruning), and the same actions when compiled."""

import json

import pytest
import torch

from vla.config import FastConfig, VLAConfig
from vla.fast import FastVLA, shuffle_groups
from vla.kernels.denoise import sampler_update
from vla.model import VLA
from vla.tokenizer import build_tokenizer

SIZE = 32
TINY = {
    "cameras": ["front", "wrist"], "image_size": SIZE, "state_dim": 7, "action_dim": 7, "horizon": 4, "n_action_steps": 2,
    "backbone": {"image_size": 32, "patch_size": 4, "scale_factor": 2, "vision_hidden": 32, "vision_layers": 2,
                 "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 3, "text_heads": 4,
                 "text_kv_heads": 2, "text_mlp": 128, "max_text_tokens": 8, "film": True},
    "head": {"type": "diffusion", "hidden": 64, "layers": 2, "heads": 2, "mlp": 128, "train_timesteps": 50,
             "inference_steps": 5},
}
TEXTS = ["press the red button", "press the blue button"]


def tiny_model(head="diffusion", image_size=SIZE, keypoint_cond=False, spatial_keypoints=0,
               keypoint_input="prefix", pixel_keypoints=0, instructed_map_weights=False) -> VLA:
    """head: diffusion (predicting the noise), diffusion-sample (predicting the chunk), flow or l1."""
    d = json.loads(json.dumps(TINY))
    d["head"]["type"], _, prediction = head.partition("-")
    d["head"]["prediction_type"] = prediction or "epsilon"
    d["image_size"] = image_size
    if keypoint_cond:
        d["keypoints"], d["keypoint_cond"], d["keypoint_input"] = 6, True, keypoint_input
    d["spatial_keypoints"], d["pixel_keypoints"] = spatial_keypoints, pixel_keypoints
    d["instructed_map_weights"] = instructed_map_weights
    torch.manual_seed(0)
    model = VLA.build(VLAConfig.from_dict(d), build_tokenizer(TEXTS)).eval()
    with torch.no_grad():  # zero-initialised layers would hide bugs: give them values
        for name, p in model.named_parameters():
            if "film" in name or "ada" in name or "keypoint_cond" in name:
                p.normal_(0, 0.05)
    return model


def plain(model, images, text, state, noise):
    ids, mask = model.backbone.tokenize([text])
    with torch.no_grad():
        return model.sample(model.encode(images[None], ids, mask, state[None]), noise=noise)


def test_pixel_shuffle_groups_are_2x2_blocks():
    g = shuffle_groups(4, 2)
    assert g.shape == (4, 4) and sorted(g[0].tolist()) == [0, 1, 4, 5] and sorted(g[3].tolist()) == [10, 11, 14, 15]


@pytest.mark.parametrize("head,image_size,kp", [("diffusion", SIZE, False), ("diffusion-sample", SIZE, False),
                                                ("flow", SIZE, False), ("l1", SIZE, False), ("diffusion", 48, False),
                                                ("diffusion", SIZE, True), ("diffusion-sample", SIZE, True),
                                                ("l1", SIZE, True), ("l1", SIZE, "spatial"),
                                                ("diffusion", 48, "both"), ("l1", SIZE, "both"),
                                                ("l1", SIZE, "pixel"), ("l1", SIZE, "maps"),
                                                ("l1", SIZE, "instructed")])
def test_full_step_equals_the_plain_path(head, image_size, kp):
    """"pixel": the spatial maps FiLM-conditioned on the instruction (model.pixel_keypoints); "maps":
    those maps' coordinates and the instruction the keypoint head's only input (keypoint_input maps);
    "instructed": "maps" with each map's output weights from the instruction too."""
    model = tiny_model(head, image_size, keypoint_cond=kp in (True, "both", "maps", "instructed"),
                       spatial_keypoints=4 if kp in ("spatial", "both", "pixel", "maps", "instructed") else 0,
                       pixel_keypoints=2 if kp in ("pixel", "maps", "instructed") else 0,
                       keypoint_input="maps" if kp in ("maps", "instructed") else "prefix",
                       instructed_map_weights=kp == "instructed")
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.rand(2, 3, image_size, image_size, generator=g), text, torch.randn(7, generator=g),
               torch.randn(1, 4, 7, generator=g)) for text in TEXTS + TEXTS[:1]]
    before = [plain(model, *i) for i in inputs]
    engine = FastVLA(model, FastConfig())
    for i, ref in zip(inputs, before):  # instruction changes re-prime the text caches
        assert torch.allclose(engine.step(*i), ref, atol=1e-5)
        # the model's own path, now through the registered attention, is unchanged
        assert torch.allclose(plain(model, *i), ref, atol=1e-6)


def test_token_reuse_is_exact_on_a_still_frame_and_close_on_a_small_change():
    model = tiny_model()
    engine = FastVLA(model, FastConfig(reuse=True, reuse_threshold=0.05, reuse_max=0.75, refresh_every=100))
    g = torch.Generator().manual_seed(2)
    images, state, noise = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(7, generator=g), torch.randn(1, 4, 7)
    engine.step(images, TEXTS[0], state, noise)
    assert engine.stats["full"] == 1
    # the same frame again: a partial step, and reused keys/values are exactly the fresh ones
    out = engine.step(images, TEXTS[0], state, noise)
    assert engine.stats["partial"] == 1
    assert torch.allclose(out, plain(model, images, TEXTS[0], state, noise), atol=1e-5)
    # one token's region changes: still partial (it is recomputed), the rest reused, error small
    moved = images.clone()
    moved[0, :, :8, :8] = torch.rand(3, 8, 8, generator=g)
    out = engine.step(moved, TEXTS[0], state, noise)
    ref = plain(model, moved, TEXTS[0], state, noise)
    assert engine.stats["partial"] == 2
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    # the second camera sees a new scene, the first does not: the first reuses its tokens, the second
    # is recomputed whole (no full refresh); the error stays bounded
    wrist_moved = moved.clone()
    wrist_moved[1] = torch.rand(3, SIZE, SIZE, generator=g)
    engine.step(moved, TEXTS[0], state, noise)  # let the moved frame's refresh settle (relevance)
    full_before = engine.stats["full"]
    out = engine.step(wrist_moved, TEXTS[0], state, noise)
    assert engine.stats["full"] == full_before and engine.stats["partial"] == 4
    ref = plain(model, wrist_moved, TEXTS[0], state, noise)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    # a whole new scene: more changed tokens than the budget -> the full recompute, exact again
    other = torch.rand(2, 3, SIZE, SIZE, generator=g)
    out = engine.step(other, TEXTS[0], state, noise)
    assert engine.stats["full"] == full_before + 1
    assert torch.allclose(out, plain(model, other, TEXTS[0], state, noise), atol=1e-5)


def test_still_front_camera_beside_a_new_wrist_view_is_exact():
    """The common reuse step on a robot: the wrist camera (moving with the arm) is recomputed whole,
    the front camera reuses most of its tokens, in one mixed vision pass. The front frame did not
    change and comes first in the causal prefix, so its reused keys/values are the fresh ones: the
    chunk equals the plain path's."""
    model = tiny_model("diffusion-sample", keypoint_cond=True)
    engine = FastVLA(model, FastConfig(reuse=True, refresh_every=100))
    g = torch.Generator().manual_seed(4)
    images, state, noise = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(7, generator=g), torch.randn(1, 4, 7)
    engine.step(images, TEXTS[1], state, noise)
    for _ in range(2):
        images = images.clone()
        images[1] = torch.rand(3, SIZE, SIZE, generator=g)
        recomputed = engine.stats["recomputed_tokens"]
        out = engine.step(images, TEXTS[1], state, noise)
        tokens = (SIZE // 4) ** 2 // 4
        assert engine.stats["recomputed_tokens"] - recomputed == tokens + tokens - int(0.75 * tokens)
        assert torch.allclose(out, plain(model, images, TEXTS[1], state, noise), atol=1e-5)


@pytest.mark.parametrize("spatial", [0, 4])
def test_reuse_recomputes_the_token_vision_keypoints_read(spatial):
    """keypoint_input "vision" reads the last visual token's output: a partial step on a still frame
    (most tokens reused) must still recompute that one, or the head is conditioned on another token."""
    model = tiny_model("l1", keypoint_cond=True, spatial_keypoints=spatial, keypoint_input="vision")
    engine = FastVLA(model, FastConfig(reuse=True, refresh_every=100))
    g = torch.Generator().manual_seed(5)
    images, state, noise = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(7, generator=g), torch.randn(1, 4, 7)
    ref = plain(model, images, TEXTS[0], state, noise)
    assert torch.allclose(engine.step(images, TEXTS[0], state, noise), ref, atol=1e-5)
    assert torch.allclose(engine.step(images, TEXTS[0], state, noise), ref, atol=1e-5)
    assert engine.stats["partial"] == 1


def test_reuse_refreshes_every_k_steps_and_on_a_new_instruction():
    model = tiny_model()
    engine = FastVLA(model, FastConfig(reuse=True, refresh_every=3))
    images, state, noise = torch.rand(2, 3, SIZE, SIZE), torch.zeros(7), torch.zeros(1, 4, 7)
    for _ in range(6):
        engine.step(images, TEXTS[0], state, noise)
    assert engine.stats == {"full": 2, "partial": 4, "recomputed_tokens": engine.stats["recomputed_tokens"]}
    engine.step(images, TEXTS[1], state, noise)
    assert engine.stats["full"] == 1 and engine.stats["partial"] == 0


def test_fastv_pruning_keeps_all_equals_plain_and_fewer_changes_little():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    images, state, noise = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(7, generator=g), torch.randn(1, 4, 7)
    ref = plain(model, images, TEXTS[1], state, noise)
    tokens = (SIZE // 4) ** 2 // 4
    keep_all = FastVLA(model, FastConfig(prune_keep=tokens, prune_layer=0)).step(images, TEXTS[1], state, noise)
    assert torch.allclose(keep_all, ref, atol=1e-5)
    half = FastVLA(model, FastConfig(prune_keep=tokens // 2, prune_layer=1)).step(images, TEXTS[1], state, noise)
    assert torch.isfinite(half).all() and not torch.allclose(half, ref, atol=1e-6)


def test_bad_fast_configs_are_refused():
    with pytest.raises(ValueError, match="exclusive"):
        FastConfig(reuse=True, prune_keep=4)
    with pytest.raises(ValueError, match="prune_keep"):
        FastVLA(tiny_model(), FastConfig(prune_keep=999))


@pytest.mark.parametrize("kp,reuse", [(False, False), (True, False), (False, True)])
def test_compiled_step_gives_the_same_actions(kp, reuse):
    model = tiny_model(keypoint_cond=kp)
    g = torch.Generator().manual_seed(4)
    images, state, noise = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.randn(7, generator=g), torch.randn(1, 4, 7)
    moved = images.clone()
    moved[:, :, :4, :4] = 1 - moved[:, :, :4, :4]  # one token region per camera changes: a partial step
    eager = FastVLA(model, FastConfig(reuse=reuse))
    engine = FastVLA(model, FastConfig(reuse=reuse, compile=True))
    engine.warmup(images, TEXTS[0], state, noise)
    # the warm-up compiled every shape: no step compiles mid-episode
    with torch._dynamo.config.patch(error_on_recompile=True):
        for frame in (images, moved):
            assert torch.allclose(engine.step(frame, TEXTS[0], state, noise),
                                  eager.step(frame, TEXTS[0], state, noise), atol=1e-4)
    if reuse:
        assert engine.stats["partial"] == eager.stats["partial"] == 1


def test_cuda_graphs_need_cuda_and_the_eager_step():
    with pytest.raises(ValueError, match="cuda_graph"):
        FastConfig(cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="CUDA device"):
        FastVLA(tiny_model(), FastConfig(cuda_graph=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("reuse,kp", [(False, False), (True, False), (True, True)])
def test_cuda_graph_replay_equals_the_eager_step(reuse, kp):
    """Same frames, instructions switching mid-way (the graphs read the text caches in place)."""
    model = tiny_model(keypoint_cond=kp).cuda()
    g = torch.Generator().manual_seed(5)
    base = torch.rand(2, 3, SIZE, SIZE, generator=g)
    frames = []
    for i in range(10):  # consecutive frames: the wrist changes, the front barely
        f = base.clone()
        f[1] = (f[1] + 0.05 * i).clamp(0, 1)
        frames.append((f.cuda(), TEXTS[i // 5], torch.randn(7, generator=g).cuda(),
                       torch.randn(1, 4, 7, generator=g).cuda()))
    eager = FastVLA(model, FastConfig(reuse=reuse), "cuda")
    graphed = FastVLA(model, FastConfig(reuse=reuse, cuda_graph=True), "cuda")
    for f in frames:
        a, b = eager.step(*f), graphed.step(*f)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert graphed.stats == eager.stats


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_the_models_ddim_sampler_is_diffusers_ddim_step(prediction):
    """The plain path, the fast path and the fused kernel all use the model's Sampler; this pins
    its update to diffusers' own DDIM step, so none of them can drift from it."""
    model = tiny_model("diffusion" if prediction == "epsilon" else "diffusion-sample")
    sch, sampler = model.infer_scheduler, model.sampler
    assert sampler.times == tuple(float(t) for t in sch.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, generator=g)
    for i, t in enumerate(sch.timesteps):
        out = torch.randn(2, 4, 7, generator=g)
        want = sch.step(out, t, x).prev_sample
        got = sampler_update(x, out, sampler.coefs[i])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        x = want


def test_flow_and_l1_samplers():
    flow = tiny_model("flow").sampler
    assert flow.times[0] == 1000.0 and not flow.from_zeros
    x, v = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    dt = 1.0 / len(flow.times)
    torch.testing.assert_close(sampler_update(x, v, flow.coefs[0]), x - dt * v)
    l1 = tiny_model("l1").sampler
    assert l1.times == (0.0,) and l1.from_zeros
    torch.testing.assert_close(sampler_update(x, v, l1.coefs[0]), v)


def test_an_engine_leaves_the_model_as_it_was_once_closed():
    model = tiny_model()
    vc, tc = model.backbone.vlm.config.vision_config, model.backbone.vlm.config.text_config
    before = (vc._attn_implementation, tc._attn_implementation)
    engine = FastVLA(model, FastConfig())
    assert hasattr(model.backbone.vlm.text_model.layers[0].self_attn, "vla_slot")
    engine.close()
    assert (vc._attn_implementation, tc._attn_implementation) == before
    assert not any(hasattr(m, "vla_slot") for m in model.modules())


def test_importing_the_fast_path_registers_nothing():
    import subprocess
    import sys

    code = ("from transformers import AttentionInterface\nimport vla.fast\n"
            "print(vla.fast.ATTN_NAME in AttentionInterface._global_mapping)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def smolvlm_shaped(tmp_path, image_size=64):
    """SmolVLM-256M's architecture at a toy width, loaded the way a checkpoint is (`pretrained`):
    scale-4 pixel shuffle, 9 query / 3 key-value heads of head_dim 16, patch 16 at 64 px."""
    from transformers import Idefics3Config, Idefics3Model

    tok = build_tokenizer(TEXTS)
    cfg = Idefics3Config(
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
                       "image_size": image_size, "patch_size": 8, "num_channels": 3},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 144, "intermediate_size": 96,
                     "num_hidden_layers": 3, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 16,
                     "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True},
        scale_factor=4, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Idefics3Model(cfg).save_pretrained(tmp_path / "smolvlm-shaped")
    tok.save_pretrained(tmp_path / "smolvlm-shaped")
    d = json.loads(json.dumps(TINY))
    d["image_size"] = 32
    d["backbone"] = {"pretrained": str(tmp_path / "smolvlm-shaped"), "max_text_tokens": 8}
    return VLA.build(VLAConfig.from_dict(d)).eval()


def test_the_fast_path_is_exact_on_a_smolvlm_shaped_backbone(tmp_path):
    """What `vla bench` measures on scripts/smolvlm_artifact.py's 256M model, at a size CI can run."""
    model = smolvlm_shaped(tmp_path)
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.rand(2, 3, 32, 32, generator=g), text, torch.randn(7, generator=g),
               torch.randn(1, 4, 7, generator=g)) for text in TEXTS]
    before = [plain(model, *i) for i in inputs]
    engine = FastVLA(model, FastConfig())
    assert engine.tokens == (64 // 8) ** 2 // 16
    for i, ref in zip(inputs, before):
        torch.testing.assert_close(engine.step(*i), ref, atol=1e-5, rtol=1e-5)
    reuse = FastVLA(model, FastConfig(reuse=True, reuse_max=0.5, refresh_every=100))
    still = inputs[0]
    reuse.step(*still)
    torch.testing.assert_close(reuse.step(*still), before[0], atol=1e-5, rtol=1e-5)  # a still frame: exact
    assert reuse.stats["partial"] == 1
