"""The VLA model, training, artifact and policy, on tiny configs and a tiny collected dataset."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vla.artifact import ArtifactError, load_artifact
from vla.config import TrainConfig, VLAConfig, load_recipe
from vla.dataset import PIXEL_KEYPOINTS, DatasetError, DatasetMeta
from vla.jobs.collect import collect
from vla.jobs.evaluate import evaluate, wilson_interval
from vla.jobs.train import Trainer, train
from vla.model import VLA, SpatialKeypoints
from vla.policies import ObservationError, Policy, SpecMismatchError, shipped_policy
from vla.tokenizer import build_tokenizer
from vla.training import pixel_keypoint_columns
from vla.transforms import augment, fit_frames, fit_points

SIZE = 32
TINY = {
    "cameras": ["front", "wrist"], "image_size": SIZE, "state_dim": 7, "action_dim": 7, "horizon": 4, "n_action_steps": 2,
    "backbone": {"image_size": 32, "patch_size": 8, "scale_factor": 2, "vision_hidden": 32, "vision_layers": 1,
                 "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2,
                 "text_kv_heads": 1, "text_mlp": 128, "max_text_tokens": 8},
    "head": {"type": "diffusion", "hidden": 64, "layers": 1, "heads": 2, "mlp": 128, "train_timesteps": 50,
             "inference_steps": 5, "noise_samples": 2},
}


def tiny_cfg(**head) -> VLAConfig:
    d = json.loads(json.dumps(TINY))
    d["head"].update(head)
    return VLAConfig.from_dict(d)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "ds"
    collect(root, ["press_button"], episodes=2, workers=1, image_size=SIZE, seed=0, progress=False)
    return root


def train_cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset), output_dir=str(out), steps=4, batch_size=8, lr=1e-3, warmup_steps=1,
                save_every=1000, log_every=1, keep_last=2, augment=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("head", ["diffusion", "flow", "l1"])
def test_shapes_and_masks(head):
    cfg = tiny_cfg(type=head)
    tok = build_tokenizer(["press the red button"])
    model = VLA.build(cfg, tok)
    ids, mask = model.backbone.tokenize(["press the red button", "press the blue button now please"])
    assert ids.shape == (2, 8) and mask[0].tolist() == [True] * 4 + [False] * 4
    images = torch.rand(2, 2, 3, SIZE, SIZE)
    cache = model.encode(images, ids, mask, torch.zeros(2, 7))
    tokens_per_image = (32 // 8) ** 2 // 4
    prefix = 8 + 2 * tokens_per_image + 1
    assert cache.mask.shape == (2, 1, 1, prefix) and len(cache.kv) == 1
    assert cache.mask[0, 0, 0, :8].tolist() == [True] * 4 + [False] * 4 and cache.mask[0, 0, 0, 8:].all()
    assert cache.kv[0][0].shape == (2, 2, prefix, 32)  # (B, heads, P, head_dim)
    chunk = model.sample(cache)
    assert chunk.shape == (2, 4, 7) and torch.isfinite(chunk).all()
    pad = torch.tensor([[False, False, True, True]] * 2)
    loss = model.loss(images, ids, mask, torch.zeros(2, 7), torch.zeros(2, 4, 7), pad)
    assert loss.ndim == 0 and loss.item() > 0


def test_instruction_embedding_depends_on_word_order():
    """Stacking names two cubes: a bag of words gave "red on blue" and "blue on red" one embedding, so
    the spatial maps' FiLM and the keypoint head (keypoint_input maps) could not tell which to lift."""
    torch.manual_seed(0)
    texts = ["stack the red cube on the blue cube", "stack the blue cube on the red cube"]
    d = json.loads(json.dumps(TINY))
    d["backbone"]["film"] = True
    d.update(keypoints=6, keypoint_input="maps", spatial_keypoints=2, pixel_keypoints=2)
    model = VLA.build(VLAConfig.from_dict(d), build_tokenizer(texts)).eval()
    ids, mask = model.backbone.tokenize(texts)
    assert torch.equal(ids[0].sort().values, ids[1].sort().values)  # the same tokens, in another order
    instruction = model.backbone.instruction_embedding(ids, mask)
    assert (instruction[0] - instruction[1]).abs().max() > 1e-3
    # the text rows of the prefix's own pass (text first, causal): the same reading of the instruction
    images, state = torch.rand(2, 2, 3, SIZE, SIZE), torch.zeros(2, 7)
    with torch.no_grad():
        _, memory, sp, _, kp_instruction = model.encode(images, ids, mask, state, return_memory=True)
    text_rows = (memory[:, :ids.shape[1]] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(text_rows, instruction, atol=1e-5)
    torch.nn.init.normal_(model.spatial.film.weight, std=0.1)
    same = images[:1].expand(2, -1, -1, -1, -1)
    maps = model.spatial_log_probs(same, instruction)  # one scene, the two instructions: different maps
    assert (maps[0] - maps[2]).abs().max() > 1e-3
    kp = model.keypoints_from_memory(memory[:1].expand(2, -1, -1), sp[:1].expand(2, -1), kp_instruction)
    assert (kp[0] - kp[1]).abs().max() > 1e-4
    # "tokens" (what format_version 1 artifacts, the shipped ones among them, were trained with): a bag of words
    d["backbone"]["instruction_pooling"] = "tokens"
    bag = VLA.build(VLAConfig.from_dict(d), build_tokenizer(texts)).backbone.instruction_embedding(ids, mask)
    assert torch.allclose(bag[0], bag[1], atol=1e-6)
    with pytest.raises(ValueError, match="instruction_pooling"):
        VLAConfig.from_dict({**d, "backbone": {"instruction_pooling": "mean"}})


def test_an_artifact_of_format_1_loads_with_the_token_mean_it_was_trained_with(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shipped_policy(), old)
    raw = json.loads((old / "config.json").read_text())
    assert raw["backbone"].pop("instruction_pooling") == "tokens"  # the shipped ones say so
    (old / "config.json").write_text(json.dumps({**raw, "format_version": 1}))
    assert load_artifact(old)[0].cfg.backbone.instruction_pooling == "tokens"
    (old / "config.json").write_text(json.dumps({**raw, "format_version": 7}))
    with pytest.raises(ArtifactError, match="format_version 7"):
        load_artifact(old)


def test_vision_path_equals_transformers_and_film_conditions_on_the_instruction():
    torch.manual_seed(0)
    d = json.loads(json.dumps(TINY))
    d["backbone"]["film"] = True
    model = VLA.build(VLAConfig.from_dict(d), build_tokenizer(["press the red button", "press the blue button"]))
    bb = model.backbone
    x = torch.rand(2, 2, 3, SIZE, SIZE)  # frames in [0, 1]; SigLIP's processor gives it 2x - 1
    ids, mask = bb.tokenize(["press the red button", "press the blue button"])
    instr = bb.instruction_embedding(ids, mask)
    ref = bb.vlm.connector(bb.vlm.vision_model(pixel_values=x.flatten(0, 1) * 2 - 1).last_hidden_state)
    # zero-initialised FiLM is the identity: the direct path equals transformers' own forward
    assert torch.allclose(bb.image_tokens(x, instr), ref.reshape(2, -1, ref.shape[-1]), atol=1e-5)
    torch.nn.init.normal_(bb.film.weight, std=0.1)
    same_images = x[:1].expand(2, -1, -1, -1, -1)
    tokens = bb.image_tokens(same_images, instr)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3  # same pixels, different instruction


def test_padded_steps_do_not_count_in_the_loss():
    torch.manual_seed(0)
    model = VLA.build(tiny_cfg(type="l1"), build_tokenizer(["x"]))
    ids, mask = model.backbone.tokenize(["x"])
    images, state = torch.rand(1, 2, 3, SIZE, SIZE), torch.zeros(1, 7)
    actions = torch.zeros(1, 4, 7)
    pad = torch.tensor([[False, False, True, True]])
    base = model.loss(images, ids, mask, state, actions, pad)
    actions[0, 2:] = 100.0  # garbage in the padded steps only
    assert torch.allclose(model.loss(images, ids, mask, state, actions, pad), base)


def test_pad_loss_trains_the_chunk_past_the_episode_end_on_the_last_action(tiny_dataset, tmp_path):
    masked = Trainer(tiny_cfg(type="l1"), train_cfg(tiny_dataset, tmp_path / "a"), progress=False)
    padded = Trainer(tiny_cfg(type="l1"), train_cfg(tiny_dataset, tmp_path / "b", pad_loss=True), progress=False)
    last = np.array([masked.ds.ep_end[0] - 1, masked.ds.ep_end[0] - 2])  # the last frames of episode 0
    a, b = masked.make_batch(last), padded.make_batch(last)
    assert a["action_is_pad"][0, 1:].all() and a["action_is_pad"][1, 2:].all() and not b["action_is_pad"].any()
    assert torch.equal(a["actions"], b["actions"])  # the tail holds the episode's last action
    assert torch.allclose(b["actions"][0], b["actions"][0, :1].expand_as(b["actions"][0]))
    # the tail counts in the loss only with pad_loss
    loss_a, loss_b = masked.model.loss(**a), padded.model.loss(**b)
    b["actions"][:, 2:] += 5.0
    a["actions"][:, 2:] += 5.0
    assert torch.allclose(masked.model.loss(**a), loss_a) and padded.model.loss(**b) > loss_b + 1.0


def test_sample_prediction_trains_and_samples_the_clean_chunk():
    """prediction_type=sample: the head's output is the chunk. A head whose output is a constant c
    (weights zeroed, bias c) has zero loss on chunks equal to c and samples exactly c; predicting
    the noise, the same head does neither."""
    c = torch.tensor([0.5, -0.25, 0.0, 0.75, -0.5, 0.1, 0.9])
    tok = build_tokenizer(["press the red button"])
    ids, mask = VLA.build(tiny_cfg(), tok).backbone.tokenize(["press the red button"] * 2)
    images, state = torch.rand(2, 2, 3, SIZE, SIZE), torch.zeros(2, 7)
    actions, pad = c.expand(2, 4, 7).clone(), torch.zeros(2, 4, dtype=torch.bool)
    for prediction, exact in (("sample", True), ("epsilon", False)):
        torch.manual_seed(0)
        model = VLA.build(tiny_cfg(prediction_type=prediction), tok)
        with torch.no_grad():
            model.head.out.weight.zero_()
            model.head.out.bias.copy_(c)
        loss = model.loss(images, ids, mask, state, actions, pad)
        chunk = model.sample(model.encode(images, ids, mask, state), generator=torch.Generator().manual_seed(0))
        assert (loss.item() < 1e-10) == exact, (prediction, loss.item())
        assert torch.allclose(chunk, actions, atol=1e-5) == exact, prediction


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_cfg(prediction_type="v_prediction")


@pytest.mark.parametrize("loss, expected", [("mse", 0.5 ** 2 / 7), ("l1", 0.5 / 7)])
def test_diffusion_loss_is_mse_or_l1_on_the_target(loss, expected):
    """A clean-chunk head whose output is off by 0.5 in one of 7 action dims, everywhere."""
    tok = build_tokenizer(["press the red button"])
    torch.manual_seed(0)
    model = VLA.build(tiny_cfg(prediction_type="sample", loss=loss), tok)
    ids, mask = model.backbone.tokenize(["press the red button"] * 2)
    c = torch.tensor([0.5, -0.25, 0.0, 0.75, -0.5, 0.1, 0.9])
    with torch.no_grad():
        model.head.out.weight.zero_()
        model.head.out.bias.copy_(c + torch.tensor([0.5, 0, 0, 0, 0, 0, 0]))
    value = model.loss(torch.rand(2, 2, 3, SIZE, SIZE), ids, mask, torch.zeros(2, 7), c.expand(2, 4, 7).clone(),
                       torch.zeros(2, 4, dtype=torch.bool))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="head.loss"):
        tiny_cfg(loss="huber")


def test_tiny_model_overfits_a_tiny_dataset(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_cfg(type="l1"), train_cfg(tiny_dataset, tmp_path / "run", steps=150, lr=2e-3,
                                                     warmup_steps=10), progress=False)
    idx = np.arange(8)
    first = None
    for _ in range(150):
        loss = trainer.train_step(trainer.make_batch(idx))
        first = first if first is not None else loss
    assert loss < 0.15 * first, (first, loss)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    final = train(tiny_cfg(), train_cfg(tiny_dataset, out, steps=6, save_every=3), progress=False)
    return out, final


def test_artifact_layout_and_save_load_same_actions(trained, tiny_dataset):
    out, final = trained
    for name in ("config.json", "backbone_config.json", "model.safetensors", "stats.json", "spec.json",
                 "recipe.yaml", "tokenizer/tokenizer.json"):
        assert (final / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000003", "step-000006"]
    spec = json.loads((final / "spec.json").read_text())
    assert spec["cameras"] == ["front", "wrist"] and spec["image_size"] == SIZE and spec["fps"] == 10
    obs = _obs()
    a = Policy.from_pretrained(final)
    b = Policy.from_pretrained(final)
    a.reset(seed=3)
    b.reset(seed=3)
    ca, cb = a.act_chunk(obs), b.act_chunk(obs)
    assert ca.shape == (4, 7) and np.array_equal(ca, cb)
    b.reset(seed=4)
    assert not np.array_equal(ca, b.act_chunk(obs))
    # the stored weights are the EMA ones
    weights = load_file(final / "model.safetensors")
    state = load_file(out / "checkpoints/step-000006/training_state.safetensors")
    key = "head.out.weight"
    assert torch.equal(weights[key], state[f"ema.{key}"]) and not torch.equal(weights[key], state[f"model.{key}"])


def test_training_and_the_policy_give_the_model_the_same_inputs_for_one_frame(trained, tiny_dataset, tmp_path):
    """One transform group: a dataset frame reaches the model identically through the trainer's batch
    and through Policy.prepare of the same observation (images in [0, 1], normalized state)."""
    _, final = trained
    trainer = Trainer(tiny_cfg(), train_cfg(tiny_dataset, tmp_path / "t", augment=False), progress=False)
    batch = trainer.make_batch(np.array([5]))
    row = trainer.ds.batch(np.array([5]))
    obs = {k: row[k][0] for k in ("observation.images.front", "observation.images.wrist", "observation.state")}
    obs["task"] = trainer.ds.meta.tasks[int(row["task_index"][0])]
    images, state = Policy.from_pretrained(final).prepare(obs)
    assert torch.equal(images, batch["images"]) and torch.allclose(state, batch["state"])
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_an_artifacts_recipe_is_the_resolved_one_and_reruns_unchanged(trained, tiny_dataset):
    """recipe.yaml once stored the source YAML plus an `overrides:` list that `vla train` refused."""
    out, final = trained
    model_cfg, cfg = load_recipe(final / "recipe.yaml")
    assert model_cfg == tiny_cfg() and cfg == train_cfg(tiny_dataset, out, steps=6, save_every=3)


@pytest.mark.parametrize("name", ["nano_l1", "nano_diffusion"])
def test_shipped_artifacts_recipes_match_their_models(name):
    """The shipped L1 policy's recipe.yaml once said head.type: diffusion (the overrides came after)."""
    from vla.policies import shipped_policy

    path = shipped_policy(name)
    model_cfg, cfg = load_recipe(path / "recipe.yaml")
    stored = json.loads((path / "config.json").read_text())
    stored.pop("format_version")
    assert model_cfg == VLAConfig.from_dict(stored) and cfg.steps > 0
    assert (path / "recipe.yaml").read_text().startswith("# ")  # how it was made, as a comment


def _obs(size=SIZE, **over):
    rng = np.random.default_rng(0)
    obs = {"observation.images.front": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
           "observation.images.wrist": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
           "observation.state": np.zeros(7, np.float32), "task": "press the red button"}
    obs.update(over)
    return obs


def test_policy_queue_and_ensembles(trained):
    final = trained[1]
    policy = Policy.from_pretrained(final)
    policy.reset(seed=1)
    chunk = policy.act_chunk(_obs())
    policy.reset(seed=1)
    actions = [policy.act(_obs()) for _ in range(2)]
    assert np.allclose(actions, chunk[:2])  # n_action_steps = 2 from the queue
    assert not policy.selector.queue
    policy.act(_obs())
    assert len(policy.selector.queue) == 1  # re-planned after two steps
    for mode in ("temporal", "adaptive"):
        p = Policy.from_pretrained(final, ensemble=mode)
        acts = [p.act(_obs()) for _ in range(3)]
        assert len(p.selector.history) == 3 and all(a.shape == (7,) and np.isfinite(a).all() for a in acts)


def test_bad_observations_and_spec_mismatch(trained):
    policy = Policy.from_pretrained(trained[1])
    with pytest.raises(ObservationError, match="observation.images.front must be uint8 32x32x3"):
        policy.act(_obs(**{"observation.images.front": np.zeros((48, 48, 3), np.uint8)}))
    with pytest.raises(ObservationError, match="non-finite"):
        policy.act(_obs(**{"observation.state": np.full(7, np.nan, np.float32)}))
    with pytest.raises(ObservationError, match="lacks 'observation.images.wrist'"):
        obs = _obs()
        del obs["observation.images.wrist"]
        policy.act(obs)
    with pytest.raises(SpecMismatchError, match="image size 32 vs 48"):
        policy.check_compatible(["front", "wrist"], 48, 7)
    with pytest.raises(SpecMismatchError, match="cameras"):
        policy.check_compatible(["front"], 32, 7)
    with pytest.raises(SpecMismatchError, match="action dim 7 vs 8"):
        policy.check_compatible(["front", "wrist"], 32, 8)


def test_eval_rejects_a_mismatched_env_and_reports_intervals(trained, tmp_path, monkeypatch):
    policy = Policy.from_pretrained(trained[1])
    summary = evaluate(policy, ["press_button"], episodes=1, workers=1, out=tmp_path / "ev", videos=1,
                       progress=False)
    assert set(summary["tasks"]) == {"press_button"} and summary["tasks"]["press_button"]["episodes"] == 1
    assert (tmp_path / "ev/results.json").is_file() and (tmp_path / "ev/success.png").is_file()
    assert len(list((tmp_path / "ev/videos").glob("*.mp4"))) == 1
    spec = policy.spec
    policy._spec = dataclasses.replace(spec, action_dim=8, action_names=None)  # an artifact made for another robot
    with pytest.raises(SpecMismatchError, match="action dim 8 vs 7"):
        evaluate(policy, ["press_button"], episodes=1, workers=1, progress=False)
    policy._spec = dataclasses.replace(spec, cameras=("front", "top"))
    with pytest.raises(SpecMismatchError, match=r"cameras \['top'\] are not in the sim"):
        evaluate(policy, ["press_button"], episodes=1, workers=1, progress=False)


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-3)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-3)
    lo, hi = wilson_interval(40, 50)
    assert lo < 0.8 < hi and hi - lo < 0.25


def test_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    straight = Trainer(cfg, train_cfg(tiny_dataset, tmp_path / "a", steps=6, save_every=3, augment=True),
                       progress=False)
    straight.run()

    # Fault injected on purpose: the run dies in its 5th step, after the step-3 checkpoint.
    killed = Trainer(cfg, train_cfg(tiny_dataset, tmp_path / "b", steps=6, save_every=3, augment=True),
                     progress=False)
    real_step = Trainer.train_step

    def dying_step(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    monkeypatch.undo()

    resumed = Trainer(cfg, train_cfg(tiny_dataset, tmp_path / "b", steps=6, save_every=3, augment=True),
                      progress=False)
    assert resumed.resume() and resumed.step == 3  # lost at most one checkpoint interval
    resumed.run()
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k
    for k, v in straight.ema.weights.items():
        assert torch.allclose(v, resumed.ema.weights[k], atol=1e-6), k
    assert resumed.opt.state_dict()["state"][0]["step"] == straight.opt.state_dict()["state"][0]["step"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, train_cfg(tiny_dataset, tmp_path / "b", steps=6), progress=False)


def test_from_pretrained_loads_a_local_idefics3_checkpoint(tmp_path):
    from transformers import Idefics3ForConditionalGeneration

    from vla.model import nano_idefics3_config

    tok = build_tokenizer(["press the red button"])
    b = tiny_cfg().backbone
    hf = Idefics3ForConditionalGeneration(nano_idefics3_config(b, len(tok), tok.pad_token_id,
                                                               tok.convert_tokens_to_ids("<image>")))
    hf.save_pretrained(tmp_path / "smolvlm-tiny")
    tok.save_pretrained(tmp_path / "smolvlm-tiny")
    d = json.loads(json.dumps(TINY))
    d["backbone"] = {"pretrained": str(tmp_path / "smolvlm-tiny"), "max_text_tokens": 8, "lora_rank": 4}
    model = VLA.build(VLAConfig.from_dict(d))
    saved = hf.model.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(model.backbone.vlm.vision_model.embeddings.patch_embedding.weight, saved)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in trainable)
    ids, mask = model.backbone.tokenize(["press the red button"])
    cache = model.encode(torch.rand(1, 2, 3, SIZE, SIZE), ids, mask, torch.zeros(1, 7))
    assert model.sample(cache).shape == (1, 4, 7)
    d["backbone"]["freeze"] = True
    d["backbone"]["lora_rank"] = 0
    frozen = VLA.build(VLAConfig.from_dict(d))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_artifact_errors_name_the_problem(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained[1], bad)
    (bad / "stats.json").unlink()
    with pytest.raises(ArtifactError, match="stats.json is missing"):
        load_artifact(bad)
    shutil.copytree(trained[1], tmp_path / "bad2")
    cfg = json.loads((tmp_path / "bad2/config.json").read_text())
    cfg["head"]["hidden"] = 96
    (tmp_path / "bad2/config.json").write_text(json.dumps(cfg))
    with pytest.raises((ArtifactError, RuntimeError)):
        load_artifact(tmp_path / "bad2")


def test_recipe_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": TINY, "train": {"steps": 10}}))
    model_cfg, cfg = load_recipe(path, ["train.steps=20", "model.head.type=flow"])
    assert cfg.steps == 20 and model_cfg.head.type == "flow"
    _, cfg = load_recipe(path, ["train.lr=2e-4"])  # YAML's string "2e-4" becomes the float
    assert cfg.lr == 2e-4
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_recipe(path, ["train.lr=fast"])
    with pytest.raises(ValueError, match="unknown head config keys"):
        load_recipe(path, ["model.head.depth=3"])


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


def test_recipes_found():
    assert {"nano_diffusion.yaml", "nano_diffusion_2h.yaml", "nano_diffusion_narrow.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_build(name):
    """Each training recipe in configs/ (a YAML with a model section) resolves and builds its model:
    a wrong key or width fails here, not an hour into a run."""
    model_cfg, cfg = load_recipe(CONFIGS / name)
    assert cfg.steps > 0 and cfg.batch_size > 0
    assert model_cfg.unresolved() == ["cameras", "state_dim", "action_dim"]  # the robot is the dataset's
    model_cfg = dataclasses.replace(model_cfg, cameras=("front", "wrist"), state_dim=7, action_dim=7)
    model = VLA.build(model_cfg, build_tokenizer(["pick up the red cube"]))
    assert model.cfg == model_cfg and sum(p.numel() for p in model.parameters()) > 1e6


def test_ddp_two_gloo_processes_match_one_process(tiny_dataset, tmp_path):
    """The same global batch through 2 DDP processes (gloo) and through 1 gives the same losses."""
    recipe = json.loads(json.dumps(TINY))
    recipe.update(horizon=1, n_action_steps=1)  # no padded steps: per-rank means average exactly
    recipe["head"]["type"] = "l1"
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({"model": recipe, "train": {
        "dataset": str(tiny_dataset), "steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
        "log_every": 1, "save_every": 100, "augment": False, "threads": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + n + os.getpid() % 1000), "-m", "vla.jobs.train", str(path), f"train.output_dir={out}"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = (out / "metrics.csv").read_text().splitlines()[1:]
        runs[n] = [float(row.split(",")[1]) for row in rows]
    assert len(runs[1]) == 3
    assert np.allclose(runs[1], runs[2], rtol=1e-4, atol=1e-5), runs


def test_batches_oversample_a_pool_deterministically():
    from vla.training import Batches

    pool = np.concatenate([np.arange(10), [0, 1] * 3])  # frames 0 and 1 four times per epoch
    a = Batches(10, 4, seed=0, pool=pool)
    epoch = np.concatenate([a.next() for _ in range(4)])
    assert sorted(epoch.tolist()) == sorted(pool.tolist())
    b = Batches(10, 4, seed=0, pool=pool)
    b.load(a.state())
    assert np.array_equal(a.next(), b.next())  # resume continues the same order


def _keypoint_error(trainer, batch) -> float:
    model = trainer.model
    with torch.no_grad():
        _, memory, spatial, _, instruction = model.encode(batch["images"], batch["input_ids"], batch["text_mask"],
                                                          batch["state"], return_memory=True)
        return float((model.keypoints_from_memory(memory, spatial, instruction) - batch["keypoints"]).abs().mean())


@pytest.mark.parametrize("source", ["prefix", "maps"])
def test_keypoint_head_learns_the_recorded_targets_and_state_dropout_hides_the_state(tiny_dataset, tmp_path,
                                                                                     source):
    d = json.loads(json.dumps(TINY))
    d.update(keypoints=6, keypoint_input=source, spatial_keypoints=4 if source == "maps" else 0)
    cfg = VLAConfig.from_dict(d)
    trainer = Trainer(cfg, train_cfg(tiny_dataset, tmp_path / "run", steps=120, lr=2e-3, warmup_steps=5,
                                     state_dropout=0.5), progress=False)
    torch.manual_seed(0)
    idx = np.arange(0, len(trainer.ds), 3)[:8]
    batch = trainer.make_batch(idx)
    assert batch["keypoints"].shape == (8, 6) and batch["state_keep"].dtype == torch.bool
    assert 0 < int(batch["state_keep"].sum()) < 8  # some samples with, some without the state
    # a dropped state is a zero token, which no real state projects to
    keep = torch.zeros(8, dtype=torch.bool)
    a = trainer.model.encode(batch["images"], batch["input_ids"], batch["text_mask"], batch["state"])
    b = trainer.model.encode(batch["images"], batch["input_ids"], batch["text_mask"], batch["state"] * 0 + 5, keep)
    c = trainer.model.encode(batch["images"], batch["input_ids"], batch["text_mask"], batch["state"], keep)
    assert not torch.allclose(a.kv[0][0], c.kv[0][0]) and torch.allclose(b.kv[0][0], c.kv[0][0])
    before = _keypoint_error(trainer, batch)
    for _ in range(120):
        trainer.train_step(trainer.make_batch(idx))
    after = _keypoint_error(trainer, batch)
    assert after < 0.3 * before, (before, after)


def test_artifact_carries_the_keypoint_normalization_and_policy_reads_keypoints_in_metres(
        tiny_dataset, tmp_path, trained):
    d = json.loads(json.dumps(TINY))
    d["keypoints"] = 6
    final = train(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "run", steps=2), progress=False)
    truth = json.loads((tiny_dataset / "meta" / "stats.json").read_text())["observation.environment_state"]
    saved = json.loads((final / "stats.json").read_text())["observation.environment_state"]
    assert saved == {k: truth[k] for k in ("mean", "std")}
    policy, obs = Policy.from_pretrained(final), _obs()
    kp = policy.keypoints(obs)
    with torch.no_grad():  # the head's normalized output, un-normalized with the dataset's own stats
        images, state = policy.prepare(obs)
        ids, mask = policy.model.backbone.tokenize([obs["task"]])
        _, memory, spatial, _, _ = policy.model.encode(images, ids, mask, state, return_memory=True)
        raw = policy.model.keypoints_from_memory(memory, spatial)[0].numpy()
    expected = raw * np.maximum(np.array(truth["std"]), 1e-3) + np.array(truth["mean"])
    assert kp.shape == (6,) and np.allclose(kp, expected, atol=1e-5)
    with pytest.raises(ValueError, match="no keypoint head"):
        Policy.from_pretrained(trained[1]).keypoints(obs)


def test_keypoints_need_a_matching_environment_state(tiny_dataset, tmp_path):
    d = json.loads(json.dumps(TINY))
    d["keypoints"] = 5  # the dataset records 6
    with pytest.raises(Exception, match="observation.environment_state"):
        Trainer(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "run"), progress=False)


def test_scene_only_collection_feeds_the_keypoint_loss(tiny_dataset, tmp_path):
    scenes = tmp_path / "scenes"
    collect(scenes, ["press_button"], episodes=6, workers=1, image_size=SIZE, seed=100_000, progress=False,
            scenes_only=True)
    from vla.dataset import LeRobotDataset

    ds = LeRobotDataset(scenes, horizon=1)
    assert len(ds) == 6 and all(e["sim_scene_only"] for e in ds.meta.episodes)
    # the start scene's keypoints: the named button, where the env puts it
    e = ds.meta.episodes[0]
    from vla.sim import make_env

    env = make_env("press_button", image_size=SIZE)
    env.reset(seed=int(e["sim_seed"]))
    assert np.allclose(ds.env_state[0], env.task.keypoints(), atol=1e-6)
    d = json.loads(json.dumps(TINY))
    d["keypoints"] = 6
    trainer = Trainer(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "run", keypoint_dataset=str(scenes),
                                                        keypoint_batch=4, state_dropout=0.5), progress=False)
    batch = trainer.make_batch(np.arange(8))
    assert batch["images"].shape[0] == 12 and batch["actions"].shape[0] == 8 and batch["keypoints"].shape == (12, 6)
    assert batch["state_keep"][8:].all()  # scenes keep their state
    assert np.isfinite(trainer.train_step(batch))
    with pytest.raises(ValueError, match="model.keypoints"):
        Trainer(tiny_cfg(), train_cfg(tiny_dataset, tmp_path / "run2", keypoint_dataset=str(scenes)), progress=False)


def test_scenes_train_the_maps_heatmaps_and_skip_the_backbone_under_maps_input(tiny_dataset, tmp_path):
    """keypoint_input "maps" reads no backbone token, so a scene's keypoint loss needs only its maps: the
    backbone runs on the demonstration rows alone, the loss is what the full pass gives, and scenes that
    record where each frame shows the points train the maps' heatmaps as demonstrations do."""
    scenes = tmp_path / "scenes"
    collect(scenes, ["press_button"], episodes=4, workers=1, image_size=SIZE, seed=100_000, progress=False,
            scenes_only=True)
    d = json.loads(json.dumps(TINY))
    d["backbone"]["film"] = True
    d.update(keypoints=6, keypoint_input="maps", spatial_keypoints=2, pixel_keypoints=2)
    trainer = Trainer(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "run", keypoint_dataset=str(scenes),
                                                        keypoint_batch=4, state_dropout=0.5), progress=False)
    b = trainer.make_batch(np.arange(8))
    n_cam = b["images"].shape[1]
    assert b["images"].shape[0] == 12 and b["pixel_keypoints"].shape[:2] == (12, n_cam)
    model = trainer.model.eval()  # no dropout: the two passes are compared exactly
    seen = []
    hook = model.backbone.vlm.connector.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    with torch.no_grad():
        torch.manual_seed(0)  # the same noise for the head's loss in both
        loss = model.loss(**b)
        hook.remove()
        cache, memory, spatial, lp, instruction = model.encode(b["images"], b["input_ids"], b["text_mask"],
                                                               b["state"], b["state_keep"], return_memory=True)
        torch.manual_seed(0)
        full = (model._action_loss(cache.first(8), b["actions"], b["action_is_pad"])
                + b["keypoint_weight"] * torch.nn.functional.smooth_l1_loss(
                    model.keypoints_from_memory(memory, spatial, instruction), b["keypoints"].float(), beta=0.1)
                + b["pixel_keypoint_weight"] * model.spatial.heatmap_loss(lp, b["pixel_keypoints"].flatten(0, 1)))
    assert seen == [8 * n_cam]  # the vision encoder saw the demonstrations' frames only
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6), (loss, full)
    assert np.isfinite(trainer.train_step(b))


def test_keypoint_conditioned_head_starts_from_an_artifact_without_it(tiny_dataset, tmp_path):
    d = json.loads(json.dumps(TINY))
    d["keypoint_cond"] = True
    with pytest.raises(ValueError, match="keypoint_cond needs model.keypoints"):
        VLA.build(VLAConfig.from_dict(d), build_tokenizer(["x"]))
    d["keypoints"], d["keypoint_cond"] = 6, False
    base = train(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "base", steps=2), progress=False)
    d["keypoint_cond"] = True
    trainer = Trainer(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "cond", steps=40, lr=2e-3,
                                                        warmup_steps=1, init=str(base)), progress=False)
    batch = trainer.make_batch(np.arange(0, len(trainer.ds), 4)[:8])
    model, old = trainer.model.eval(), Policy.from_pretrained(base).model
    noise = torch.randn(8, 4, 7, generator=torch.Generator().manual_seed(0))

    def chunk(m, keypoints=None):
        with torch.no_grad():
            cache = m.encode(batch["images"], batch["input_ids"], batch["text_mask"], batch["state"])
            if keypoints is not None:
                cache.cond = m.head.keypoint_cond(keypoints)
            return m.sample(cache, noise=noise)

    assert torch.allclose(chunk(model), chunk(old), atol=1e-5)  # zero-initialized: the same policy at first
    # the action loss reaches the conditioning layer, not the keypoint head (its input is detached)
    model.train().zero_grad()
    model.loss(**{**batch, "keypoint_weight": 0.0}).backward()
    assert model.head.keypoint_cond.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.keypoint_head.parameters())
    for _ in range(40):
        trainer.train_step(batch)
    model.eval()
    assert not torch.allclose(chunk(model), chunk(model, batch["keypoints"] + 1.0), atol=1e-3)


def test_spatial_keypoints_read_where_a_dot_is_at_sub_patch_precision():
    """The readout's (x, y) follow a 2-px dot across the frame in steps smaller than a vision
    patch: each map's expected coordinate, x along the width and y down the height."""
    readout = SpatialKeypoints(maps=1, channels=1)
    convs = (readout.stem[0], readout.stem[2], readout.stem[4], readout.out[1])
    with torch.no_grad():  # one map that is the red channel's brightness, sharpened
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
        for conv in convs:
            k = conv.weight.shape[-1] // 2
            conv.weight[0, 0, k, k] = 1.0
        readout.log_temperature.fill_(5.0)
    readings = []
    for col in (10, 13, 16, 70):
        frame = torch.zeros(1, 3, 96, 96)
        frame[0, 0, 40:42, col:col + 2] = 1.0
        with torch.no_grad():
            readings.append(readout(frame)[0])
    x = torch.stack(readings)[:, 0]
    assert torch.all(x[1:] > x[:-1]) and float(x[1] - x[0]) < 2 * 8 / 96  # moves with the dot, finer than a patch
    assert abs(float(x[3]) - (71 / 96 * 2 - 1)) < 0.05 and abs(float(readings[0][1]) - (41 / 96 * 2 - 1)) < 0.05


def _dot_frames(n: int, rng: np.random.Generator, size: int = 48):
    """Frames on a noisy brown table with a 2-px red dot and a 2-px blue dot at random places, and
    where they are ((n, 2 (red, blue), 2 (x, y)) in [-1, 1]); the frames as the encoder takes them."""
    frames = np.empty((n, 3, size, size), np.float32)
    frames[:] = np.array([0.45, 0.3, 0.2], np.float32)[:, None, None]
    frames += rng.normal(0, 0.03, frames.shape).astype(np.float32)
    points = np.zeros((n, 2, 2), np.float32)
    for i in range(n):
        for k, colour in enumerate(([0.8, 0.1, 0.1], [0.1, 0.2, 0.9])):
            r, c = rng.integers(2, size - 3, 2)
            frames[i, :, r:r + 2, c:c + 2] = np.array(colour, np.float32)[:, None, None]
            points[i, k] = (c + 1) / size * 2 - 1, (r + 1) / size * 2 - 1
    return torch.from_numpy(frames * 2 - 1), torch.from_numpy(points)


def _fit_instructed_maps(readout: SpatialKeypoints, frames: torch.Tensor, instructions: torch.Tensor,
                         targets_of, steps: int) -> None:
    """Adam (lr 1e-2) on the heatmap loss, each frame under one of the instructions' embeddings (rows of
    `instructions`) drawn anew each step; targets_of(which: (N,) row indices) -> the points (N, P, 2)."""
    opt = torch.optim.Adam(readout.parameters(), lr=1e-2)
    for _ in range(steps):
        which = torch.randint(0, len(instructions), (len(frames),))
        lp = readout.log_probs(frames, readout.film_params(instructions[which]))
        loss = readout.heatmap_loss(lp, targets_of(which))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_heatmap_loss_trains_an_instructed_detector_that_finds_dots_in_new_layouts():
    """model.pixel_keypoints: map 0 trained (heatmap loss) on the red dot under one instruction and on
    the blue dot under another (FiLM picks which) finds them in layouts it never saw, to about a
    pixel: what a regression from a few dozen layouts did not learn."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    readout = SpatialKeypoints(maps=2, channels=16, instruction_dim=2)
    instructions = torch.eye(2)  # one embedding per instruction: "the red dot", "the blue dot"
    frames, points = _dot_frames(40, rng)  # 40 layouts, as many demonstrations as a few tasks have
    _fit_instructed_maps(readout, frames, instructions,
                         lambda which: points[torch.arange(len(frames)), which][:, None], 250)
    test_frames, test_points = _dot_frames(40, np.random.default_rng(1))
    with torch.no_grad():
        for k in range(2):
            film = readout.film_params(instructions[k].expand(len(test_frames), -1))
            found = readout(test_frames, film).view(-1, 2, 2)[:, 0]
            pixels = (found - test_points[:, k]).norm(dim=-1) * 48 / 2
            assert float(pixels.median()) < 1.5, (k, pixels)


def test_the_heatmap_loss_is_lowest_at_the_point_and_leaves_out_points_off_the_frame():
    readout = SpatialKeypoints(maps=1, channels=1)
    lp = torch.full((1, 1, 8, 8), -1e4)
    lp[0, 0, 2, 5] = 0.0  # all mass on cell (row 2, column 5): centre x = (5.5 / 8) * 2 - 1
    at = torch.tensor([[[5.5 / 8 * 2 - 1, 2.5 / 8 * 2 - 1]]])
    assert readout.heatmap_loss(lp, at) < readout.heatmap_loss(lp, at + 0.25)
    off = torch.tensor([[[1.5, 0.0]]])
    assert float(readout.heatmap_loss(lp, off)) == 0.0 and float(readout.heatmap_loss(lp, off * np.nan)) == 0.0


def test_augment_moves_pixel_keypoints_with_their_frames():
    images = torch.zeros(16, 2, 3, 24, 24)
    points = torch.zeros(16, 2, 1, 2)
    rng = np.random.default_rng(0)
    for i in range(16):
        for c in range(2):
            r, col = rng.integers(6, 18, 2)
            images[i, c, :, r, col] = 1.0
            points[i, c, 0] = torch.tensor([(col + 0.5) / 24 * 2 - 1, (r + 0.5) / 24 * 2 - 1])
    torch.manual_seed(0)
    moved_images, moved = augment(images, 4, points)
    assert not torch.equal(moved, points)  # some frames were shifted
    flat = moved_images.sum(2).flatten(2).argmax(-1)  # the bright pixel, after the shift
    rows, cols = flat // 24, flat % 24
    expect = torch.stack([(cols + 0.5) / 24 * 2 - 1, (rows + 0.5) / 24 * 2 - 1], -1)
    assert torch.allclose(moved[:, :, 0], expect, atol=1e-5)


@pytest.mark.parametrize("fit", ["pad", "crop", "resize"])
def test_fit_points_follows_fit_frames(fit):
    """Where a 60 x 80 frame shows a dot, fitted to 32 px as the reader fits frames."""
    frames = np.zeros((3, 60, 80, 3), np.uint8)
    spots = [(30, 40), (12, 25), (50, 60)]
    for i, (r, c) in enumerate(spots):
        frames[i, r - 2:r + 2, c - 2:c + 2] = 255
    points = np.array([[c / 80 * 2 - 1, r / 60 * 2 - 1] for r, c in spots], np.float32)
    fitted = fit_frames(frames, 32, fit).astype(np.float32).sum(-1)
    mapped = (fit_points(points, 60, 80, 32, fit) + 1) / 2 * 32  # pixels of the fitted frame
    for i in range(3):
        rows, cols = np.nonzero(fitted[i] > 0.5 * fitted[i].max())
        if fit == "crop" and not len(rows):
            continue
        centre = np.array([(cols.mean() + 0.5), (rows.mean() + 0.5)])
        assert np.abs(centre - mapped[i]).max() < 1.0, (fit, i, centre, mapped[i])


def test_pixel_keypoints_need_the_datasets_pixel_keypoints(tiny_dataset, tmp_path):
    d = json.loads(json.dumps(TINY))
    d.update(spatial_keypoints=3, pixel_keypoints=3)  # the tabletop suite records 2 points a camera
    with pytest.raises(DatasetError, match="observation.pixel_keypoints"):
        Trainer(VLAConfig.from_dict(d), train_cfg(tiny_dataset, tmp_path / "run"), progress=False)
    meta = DatasetMeta(tiny_dataset)
    assert pixel_keypoint_columns(meta, ("front", "wrist"), 2).shape[0] == 2  # the 2 points per camera exist
    del meta.features[PIXEL_KEYPOINTS]  # as a dataset recorded without them
    with pytest.raises(DatasetError, match=f"needs an {PIXEL_KEYPOINTS} feature"):
        pixel_keypoint_columns(meta, ("front", "wrist"), 2)
    d.update(spatial_keypoints=2)
    with pytest.raises(ValueError, match="spatial_keypoints"):
        VLA.build(VLAConfig.from_dict(d), build_tokenizer(["press the red button"]))


@pytest.mark.parametrize("spatial", [0, 4])
def test_vision_keypoint_input_is_blind_to_the_state(spatial):
    """keypoint_input "vision": the keypoint head cannot fit the target from the hand's position
    (the state token), so it must find it in the frames; "prefix" reads a token that sees the state.
    "maps" reads the spatial maps' coordinates as they are: the same coordinates give the same
    keypoints whatever the language model's tokens hold (a token's spread rescaled the coordinates
    under the LayerNorm the other inputs share), and another instruction gives others."""
    texts = ["push the puck to the goal", "reach the goal"]
    tok = build_tokenizer(texts)
    readings, token_spread = {}, {}
    for source in ("prefix", "vision") + (("maps",) if spatial else ()):
        d = json.loads(json.dumps(TINY))
        d.update(keypoints=6, keypoint_input=source, spatial_keypoints=spatial)
        torch.manual_seed(0)
        model = VLA.build(VLAConfig.from_dict(d), tok).eval()
        ids, mask = model.backbone.tokenize(texts[:1] * 2)
        images = torch.rand(1, 2, 3, SIZE, SIZE).expand(2, -1, -1, -1, -1)
        state = torch.stack([torch.zeros(7), torch.full((7,), 3.0)])  # two hands, one scene
        with torch.no_grad():
            _, memory, sp, _, instruction = model.encode(images, ids, mask, state, return_memory=True)
            readings[source] = model.keypoints_from_memory(memory, sp, instruction)
            if spatial:  # how far the keypoints move when the coordinates do, as the tokens' spread grows
                read = model.keypoints_from_memory
                moved = [read(m, sp + 0.1, instruction) - read(m, sp, instruction) for m in (memory, memory * 4)]
                token_spread[source] = [float(m.abs().mean()) for m in moved]
            if source == "maps":
                other_ids, other_mask = model.backbone.tokenize(texts[1:] * 2)
                other = model.keypoints_from_memory(memory, sp, model.keypoint_instruction(
                    model.instruction_embedding(other_ids, other_mask)))
                assert not torch.allclose(other, readings["maps"], atol=1e-4)
                with pytest.raises(ValueError, match="keypoint_instruction"):
                    model.keypoints_from_memory(memory, sp)
    assert not torch.allclose(readings["prefix"][0], readings["prefix"][1], atol=1e-4)
    for source in readings.keys() - {"prefix"}:
        assert torch.allclose(readings[source][0], readings[source][1], atol=1e-5)
    if spatial:  # the LayerNorm shared with a token divides the coordinates by its spread; "maps" has none
        plain_spread, wide_spread = token_spread["vision"]
        assert wide_spread < 0.5 * plain_spread, token_spread
        assert token_spread["maps"][0] > 0 and token_spread["maps"][0] == pytest.approx(token_spread["maps"][1])
    d = json.loads(json.dumps(TINY))
    d.update(keypoints=6, keypoint_input="pixels")
    with pytest.raises(ValueError, match="keypoint_input must be one of"):
        VLA.build(VLAConfig.from_dict(d), tok)
    d.update(keypoint_input="maps", spatial_keypoints=0)
    with pytest.raises(ValueError, match="keypoint_input=maps reads the spatial maps"):
        VLA.build(VLAConfig.from_dict(d), tok)


def _residual_of_affine_fit(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per image, the largest error of the best `after = a * before + b` over the pixels the jitter
    did not clamp (0 when no pixel moved)."""
    out = []
    for x, y in zip(before.flatten(1), after.flatten(1)):
        keep = (y > 1e-6) & (y < 1 - 1e-6)
        x, y = x[keep].double(), y[keep].double()
        a = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
        out.append((y - (a * x + y.mean() - a * x.mean())).abs().max())
    return torch.stack(out)


def test_augment_shift_zero_jitters_colour_and_moves_no_pixel():
    torch.manual_seed(0)
    images = 0.3 + 0.4 * torch.rand(8, 1, 3, 24, 24)  # no clamping under the jitter
    unshifted = _residual_of_affine_fit(images[:, 0], augment(images, 0)[:, 0])
    shifted = _residual_of_affine_fit(images[:, 0], augment(images, 4)[:, 0])
    assert unshifted.max() < 1e-5
    assert (shifted > 0.05).sum() >= 6  # a shift of 0 is drawn 1 time in 81


def test_the_mt10_recipe_builds_with_and_without_the_sim_targets():
    """configs/metaworld_mt10.yaml's own note: on a dataset without environment_state and pixel
    keypoints, model.keypoints=0 model.keypoint_cond=false model.pixel_keypoints=0
    model.instructed_map_weights=false."""
    tok = build_tokenizer(["reach the goal position"])
    for overrides in ([], ["model.keypoints=0", "model.keypoint_cond=false", "model.pixel_keypoints=0",
                           "model.instructed_map_weights=false"]):
        cfg = dataclasses.replace(load_recipe("configs/metaworld_mt10.yaml", overrides)[0], cameras=("corner2",),
                                  state_dim=4, action_dim=4)
        model = VLA.build(cfg, tok)
        assert (model.keypoint_head is None) == bool(overrides) and model.spatial is not None


def test_augment_shift_is_a_train_option_and_rejects_negative_pixels():
    assert load_recipe("configs/metaworld_mt10.yaml", ["train.augment_shift=0"])[1].augment_shift == 0
    with pytest.raises(ValueError, match="augment_shift"):
        TrainConfig(augment_shift=-2)


def test_the_trainer_shifts_its_images_by_train_augment_shift(tiny_dataset, tmp_path):
    rows = np.arange(8)
    plain = Trainer(tiny_cfg(), train_cfg(tiny_dataset, tmp_path / "a"), progress=False).make_batch(rows)["images"]
    torch.manual_seed(0)
    jittered = Trainer(tiny_cfg(), train_cfg(tiny_dataset, tmp_path / "b", augment=True, augment_shift=0),
                       progress=False).make_batch(rows)["images"]
    torch.manual_seed(0)
    shifted = Trainer(tiny_cfg(), train_cfg(tiny_dataset, tmp_path / "c", augment=True, augment_shift=4),
                      progress=False).make_batch(rows)["images"]
    assert _residual_of_affine_fit(plain.flatten(0, 1), jittered.flatten(0, 1)).max() < 1e-4
    assert (_residual_of_affine_fit(plain.flatten(0, 1), shifted.flatten(0, 1)) > 0.01).sum() >= 8


def _train_ordered_maps(instructed_weights: bool, steps: int = 600) -> list[float]:
    """Maps 0 and 1 trained (heatmap loss) on the first- and the second-named dot of "red on blue" /
    "blue on red" (one embedding each): two dots that differ only by colour and roles told apart only
    by the words' order, as stacking's cubes, through a hidden layer of 2 channels, too few to keep a
    copy of each colour per map. The median pixel error of each map on new layouts."""
    torch.manual_seed(0)
    readout = SpatialKeypoints(maps=2, channels=2, instruction_dim=2, instructed_weights=instructed_weights)
    instructions = torch.eye(2)  # 0: red (map 0) on blue (map 1); 1: blue (map 0) on red (map 1)
    frames, points = _dot_frames(40, np.random.default_rng(0))
    _fit_instructed_maps(readout, frames, instructions,
                         lambda which: torch.where((which == 0)[:, None, None], points, points.flip(1)), steps)
    test_frames, test_points = _dot_frames(40, np.random.default_rng(1))
    errors = []
    with torch.no_grad():
        for k in range(2):
            found = readout(test_frames, readout.film_params(instructions[k].expand(len(test_frames), -1)))
            expected = test_points if k == 0 else test_points.flip(1)
            errors += ((found.view(-1, 2, 2) - expected).norm(dim=-1) * 48 / 2).median(0).values.tolist()
    return errors


def test_instructed_map_weights_find_two_objects_told_apart_only_by_the_words_order():
    """model.instructed_map_weights: each map's output weights come from the instruction too, so under
    "red on blue" map 0 finds red and map 1 blue, and under "blue on red" the other way round. With
    only the FiLM, shared by both maps, fixed output weights cannot swap the two maps' colours (stacking's
    goal cube was 5-15 cm off in session 28)."""
    instructed, film_only = _train_ordered_maps(True), _train_ordered_maps(False)
    assert max(instructed) < 1.5, instructed
    assert max(film_only) > 5, film_only


def test_instructed_map_weights_need_the_maps_pixel_keypoints_train():
    """Without model.pixel_keypoints the maps read no instruction: the setting would do nothing, so it
    is refused by name rather than dropped."""
    d = json.loads(json.dumps(TINY))
    d.update(spatial_keypoints=2, instructed_map_weights=True)
    with pytest.raises(ValueError, match="model.instructed_map_weights .* model.pixel_keypoints"):
        VLA.build(VLAConfig.from_dict(d), build_tokenizer(["press the red button"]))
    with pytest.raises(ValueError, match="instruction_dim"):
        SpatialKeypoints(maps=2, instructed_weights=True)
