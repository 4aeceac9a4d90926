"""Personalisation (DreamBooth-LoRA, diffalign.personalize) on tiny-random: bad input refused before
anything is written, outputs of a short run, learning, the class-image cache, exact resumption."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign import sampling
from diffalign.config import ConfigError
from diffalign.errors import DiffalignError
from diffalign.personalize import Example, Personalizer, load_personalize_config, personalize
from diffalign.subjects import SubjectError, load_subjects

TINY = [
    "model=tiny-random",
    "steps=2",
    "save_every=2",
    "eval.every=2",
    "eval.num_steps=2",
    "eval.images_per_prompt=1",
    "prior.class_images=2",
    "prior.num_steps=2",
    "learning_rate=1e-2",
]


def _write_subject(folder, colour, count=2, size=(40, 40), mask=False):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        array = np.full((size[1], size[0], 3), 255, np.uint8)
        array[8:30, 4 + 3 * index : 24 + 3 * index] = colour
        Image.fromarray(array).save(folder / f"{index}.png")
        if mask:
            Image.fromarray(((array != 255).any(-1) * 255).astype(np.uint8)).save(
                folder / f"{index}.mask.png"
            )
    return folder


@pytest.fixture()
def folders(tmp_path):
    return {
        "toy": _write_subject(tmp_path / "toy", (200, 30, 30)),
        "dog": _write_subject(tmp_path / "dog", (30, 30, 200)),
    }


def _subjects(*items):
    return "subjects=" + json.dumps(
        [{"identifier": i, "class_word": c, "folder": str(f)} for i, c, f in items]
    )


def _config(tmp_path, name, subjects, *extra):
    return load_personalize_config(None, [*TINY, subjects, f"output_dir={tmp_path / name}", *extra])


def _refused(tmp_path, cache, subjects, *extra):
    """The error of a run that must be refused before training, having written nothing."""
    with pytest.raises(DiffalignError) as caught:
        personalize(_config(tmp_path, "run", subjects, *extra), progress=False)
    assert not (tmp_path / "run").exists()
    assert not cache.exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_empty_folder_is_refused(tmp_path, cache, folders):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    message = _refused(tmp_path, cache, _subjects(("olis", "toy", empty)))
    assert "holds no images" in message and str(empty) in message


def test_unreadable_image_is_named(tmp_path, cache, folders):
    (folders["toy"] / "broken.png").write_bytes(b"\x89PNG not really")
    message = _refused(tmp_path, cache, _subjects(("olis", "toy", folders["toy"])))
    assert "broken.png" in message and "cannot read image" in message


def test_mask_of_another_size_names_both_sizes(tmp_path, cache, folders):
    Image.new("L", (20, 30), 255).save(folders["toy"] / "0.mask.png")
    message = _refused(tmp_path, cache, _subjects(("olis", "toy", folders["toy"])))
    assert "0.mask.png" in message and "20x30" in message and "40x40" in message


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ((("photo", "toy"),), "common English word"),
        ((("olis", "toy"), ("toy", "dog")), "class word"),
        ((("olis", "toy"), ("olis", "dog")), "given to two subjects"),
        ((("olis toy", "toy"),), "one word"),
    ],
)
def test_colliding_identifiers_are_refused(tmp_path, cache, folders, items, expected):
    subjects = _subjects(*[(ident, cls, folders[cls]) for ident, cls in items])
    with pytest.raises(ConfigError, match=expected):
        _config(tmp_path, "run", subjects)
    # The same check runs on the Python API's subject loader.
    with pytest.raises(SubjectError, match=expected):
        load_subjects([(ident, cls, folders[cls]) for ident, cls in items])


def test_world_vocabulary_is_reserved(folders):
    with pytest.raises(SubjectError, match="word of the model's prompts"):
        load_subjects([("zorp", "toy", folders["toy"])], reserved={"zorp"})


def test_composing_mode_needs_every_subject_in_each_prompt(tmp_path, cache, folders):
    subjects = _subjects(("olis", "toy", folders["toy"]), ("hta", "dog", folders["dog"]))
    with pytest.raises(ConfigError, match=r"names 1 of the 2 subjects \(missing 'hta dog'\)"):
        _config(tmp_path, "run", subjects, "mode=cutmix", "eval.prompts=['olis toy on a beach']")
    with pytest.raises(ConfigError, match="at least two"):
        _config(tmp_path, "run", _subjects(("olis", "toy", folders["toy"])), "mode=segmix")
    # In dreambooth mode a grid prompt may name one subject, or none.
    _config(tmp_path, "run", subjects, "eval.prompts=['olis toy on a beach', 'a photo of a dog']")


def test_segmix_without_masks_is_refused(tmp_path, cache, folders, monkeypatch):
    subjects = _subjects(("olis", "toy", folders["toy"]), ("hta", "dog", folders["dog"]))
    message = _refused(tmp_path, cache, subjects, "mode=segmix")
    assert "no mask" in message and "olis toy" in message
    assert "NAME.mask.png" in message and "segmentation.checkpoint" in message  # both fixes are named


def test_cli_reports_bad_input_in_one_line(tmp_path, cache, folders, capsys):
    from diffalign.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["personalize", "--subject", "olis", "toy", str(empty), "--output-dir", str(tmp_path / "run"),
                 "--set", "model=tiny-random", "--no-progress"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "holds no images" in error
    assert not (tmp_path / "run").exists()


def test_short_run_writes_metrics_grids_and_a_loadable_lora(tmp_path, cache, folders, tiny_pipe_factory):
    subjects = _subjects(("olis", "toy", folders["toy"]), ("hta", "dog", folders["dog"]))
    result = personalize(_config(tmp_path, "run", subjects), progress=False)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "instance_loss", "prior_loss", "seconds"} <= set(r) for r in records)
    assert records[0]["loss"] == pytest.approx(
        records[0]["instance_loss"] + records[0]["prior_loss"], rel=1e-5
    )
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000.png", "step-0002.png"]
    assert (out / "checkpoints" / "epoch-0002").is_dir()

    saved = load_file(str(result.lora_dir / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("unet.") for key in saved)
    pipe = tiny_pipe_factory()
    latents = sampling.initial_latents(pipe, 1, torch.Generator().manual_seed(0))
    base = sampling.sample(pipe, ["a photo of olis toy"], num_steps=2, eta=0.0, latents=latents).images
    pipe.load_lora_weights(str(result.lora_dir))  # any diffusers program can do this
    assert pipe.get_active_adapters()
    tuned = sampling.sample(pipe, ["a photo of olis toy"], num_steps=2, eta=0.0, latents=latents).images
    assert not torch.allclose(base, tuned)  # the adapter trained and loaded changes what is drawn


def test_loss_goes_down_when_overfitting_one_image(tmp_path, cache):
    folder = _write_subject(tmp_path / "one", (200, 30, 30), count=1)
    config = _config(
        tmp_path, "run", _subjects(("olis", "toy", folder)), "prior.enabled=false", "steps=40", "save_every=40",
        "eval.every=40", "lora.rank=8", "learning_rate=1e-2",
        # tiny-random has attention only at 8x8: too little to fit an image, so the convolutions train too.
        "lora.target_modules=[to_q, to_k, to_v, to_out.0, conv1, conv2, conv_in, conv_out]",
    )  # fmt: skip
    run = Personalizer(config)
    subject = run.subjects[0]
    fixed = [Example(subject.images[0], "a photo of olis toy")] * 8

    def fixed_loss():
        with torch.no_grad():
            return run.losses(fixed, torch.Generator().manual_seed(123)).mean().item()

    first = fixed_loss()
    for _ in range(40):
        _update(run)
    assert fixed_loss() < 0.5 * first  # measured: 1.11 -> 0.25


def _update(run):
    """One optimizer step of ``run`` without its bookkeeping (grids, checkpoints)."""
    generator = torch.Generator().manual_seed(run.step)
    run.step += 1
    instances, _ = run.draw(np.random.default_rng(run.step))
    loss = run.losses(instances, generator).mean()
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.optimizer.zero_grad()


def test_class_images_are_generated_once_and_reused(tmp_path, cache, folders, monkeypatch):
    calls = []
    original = sampling.sample

    def counting(pipe, prompts, **kwargs):
        calls.append(prompts[0])
        return original(pipe, prompts, **kwargs)

    monkeypatch.setattr(sampling, "sample", counting)
    subjects = _subjects(("olis", "toy", folders["toy"]))
    personalize(_config(tmp_path, "first", subjects, "steps=1", "save_every=1"), progress=False)
    assert calls.count("a photo of a toy") == 1  # 2 class images, one batch
    cached = [p for p in (cache / "class-images").iterdir() if not p.name.startswith(".")]  # not the locks
    assert len(cached) == 1 and sorted(p.name for p in cached[0].iterdir())[:2] == ["00000.png", "00001.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in cached[0].iterdir()}

    calls.clear()
    personalize(_config(tmp_path, "second", subjects, "steps=1", "save_every=1"), progress=False)
    assert "a photo of a toy" not in calls
    assert {p.name: p.stat().st_mtime_ns for p in cached[0].iterdir()} == stamps
    # Another count is another set of class images.
    personalize(
        _config(tmp_path, "third", subjects, "steps=1", "save_every=1", "prior.class_images=3"),
        progress=False,
    )
    assert len([p for p in (cache / "class-images").iterdir() if not p.name.startswith(".")]) == 2


def _class_images_in_a_process(cache_folder, overrides, results):
    import os

    os.environ["DIFFALIGN_CACHE"] = cache_folder
    from diffalign import pipeline
    from diffalign.personalize import class_images

    config = load_personalize_config(None, overrides)
    images = class_images(pipeline.load("tiny-random"), config, "toy")
    results.put([np.asarray(image).tolist() for image in images])


def test_two_processes_making_the_same_class_images_take_turns(tmp_path, cache, folders):
    # Two personalize jobs started together need the same class images: one makes them while the
    # other waits for the lock and then reads them (before the lock, the second removed the first's
    # half-written folder as debris and the first failed).
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    overrides = [
        *TINY,
        _subjects(("olis", "toy", folders["toy"])),
        "prior.class_images=6",
        "prior.num_steps=3",
    ]
    workers = [
        context.Process(target=_class_images_in_a_process, args=(str(cache), overrides, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    made = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert made[0] == made[1] and len(made[0]) == 6
    entries = list((cache / "class-images").iterdir())
    assert [p for p in entries if p.name.startswith(".diffalign-tmp-")] == []


def test_debris_of_one_cache_entry_leaves_other_entries_writes_alone(tmp_path):
    from diffalign import outputs

    (tmp_path / ".diffalign-tmp-aaa-123").mkdir()  # an interrupted write of entry aaa
    (tmp_path / ".diffalign-tmp-bbb-456").mkdir()  # another process writing entry bbb right now
    with outputs.cache_entry_lock(tmp_path / "aaa"):
        assert not (tmp_path / ".diffalign-tmp-aaa-123").exists()
        assert (tmp_path / ".diffalign-tmp-bbb-456").exists()


def test_resumed_run_matches_uninterrupted_run(tmp_path, cache, folders):
    subjects = _subjects(("olis", "toy", folders["toy"]), ("hta", "dog", folders["dog"]))
    full = personalize(_config(tmp_path, "full", subjects, "steps=4"), progress=False)
    personalize(_config(tmp_path, "cut", subjects, "steps=2"), progress=False)
    with pytest.raises(DiffalignError, match="already holds a run"):
        personalize(_config(tmp_path, "cut", subjects, "steps=4"), progress=False)
    with pytest.raises(ConfigError, match="learning_rate"):
        personalize(_config(tmp_path, "cut", subjects, "steps=4", "learning_rate=1e-3"), resume=True)
    resumed = personalize(_config(tmp_path, "cut", subjects, "steps=4"), resume=True, progress=False)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    for ours, reference in zip(resumed.history, full.history):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert ours[key] == pytest.approx(reference[key], rel=1e-6), key
    ours = load_file(str(resumed.lora_dir / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(full.lora_dir / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(ours[key], reference[key], atol=1e-7) for key in reference)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


# --- MuDI wired in: composing modes, masks from a segmenter, mean shift, subject sets, D&C ---------------


def _pair(folders, tmp_path, masks=True):
    toy = _write_subject(tmp_path / "mtoy", (200, 30, 30), mask=masks)
    dog = _write_subject(tmp_path / "mdog", (30, 30, 200), mask=masks)
    return _subjects(("olis", "toy", toy), ("hta", "dog", dog))


@pytest.mark.parametrize("mode", ["cutmix", "segmix"])
def test_composing_modes_train_on_compositions(tmp_path, cache, folders, mode):
    config = _config(tmp_path, "run", _pair(folders, tmp_path), f"mode={mode}", "mix_probability=1",
                     "prior.enabled=false")  # fmt: skip
    result = personalize(config, progress=False)
    # Every example (one per subject per step) is a composition of both subjects.
    assert [r["composed"] for r in result.history] == [2, 2]
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_segmix_masks_come_from_a_segmenter_when_a_checkpoint_is_given(tmp_path, cache, folders):
    toy = _write_subject(tmp_path / "mtoy", (200, 30, 30), mask=True)
    subjects = _subjects(("olis", "toy", toy), ("hta", "dog", folders["dog"]))
    segment = ["mode=segmix", "segmentation.checkpoint=tiny-random", "eval.dnc_scorer=''"]
    # A segmenter that finds nothing is a clear error before the run, not a "redraw the mask" mid-run.
    message = _refused(tmp_path, cache, subjects, *segment, "segmentation.threshold=0.999")
    assert "found no 'dog'" in message and "threshold" in message

    run = Personalizer(_config(tmp_path, "made", subjects, *segment))
    given, made = run.subjects
    drawn = load_subjects([("olis", "toy", toy)])[0].masks
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(given.masks, drawn))  # kept
    assert all(m is not None and m.size == i.size and m.mode == "L" for m, i in zip(made.masks, made.images))
    record = json.loads((tmp_path / "made" / "subjects.json").read_text())
    assert [(s["masks_given"], s["masks_made"]) for s in record["subjects"]] == [(2, 0), (0, 2)]
    assert record["subject_set"] is None


def test_mean_shift_needs_masks_and_changes_the_grid(tmp_path, cache, folders):
    unmasked = _subjects(("olis", "toy", folders["toy"]), ("hta", "dog", folders["dog"]))
    message = _refused(tmp_path, cache, unmasked, "eval.mean_shift=1")
    assert "eval.mean_shift" in message and "segmentation.checkpoint" in message
    grids = {}
    for gamma in (0.0, 1.0):
        run = Personalizer(_config(tmp_path, f"g{gamma}", _pair(folders, tmp_path), f"eval.mean_shift={gamma}",
                                   "eval.dnc_scorer=''"))  # fmt: skip
        run.evaluate()
        grids[gamma] = np.asarray(Image.open(tmp_path / f"g{gamma}" / "samples" / "step-0000.png"))
    assert grids[0.0].shape == grids[1.0].shape and not np.array_equal(grids[0.0], grids[1.0])


def test_a_dnc_scorer_that_cannot_read_the_subjects(tmp_path, cache, folders):
    subjects = _pair(folders, tmp_path)
    # Named, ShapesWorld's exact scorer cannot read photos of a toy and a dog: refused before anything is written.
    message = _refused(tmp_path, cache, subjects, "eval.dnc_scorer=shapes-exact")
    assert "cannot score these subjects" in message
    # auto picks it for tiny-random (a ShapesWorld model) and turns D&C off, with a warning.
    with pytest.warns(UserWarning, match="no D&C during evaluation"):
        assert Personalizer(_config(tmp_path, "auto", subjects)).dnc_scorer is None
    with pytest.raises(ConfigError, match="Did you mean 'shapes-exact'"):
        _config(tmp_path, "run", subjects, "eval.dnc_scorer=shapes-exakt")


def test_the_generic_dnc_scorer_logs_eval_metrics(tmp_path, cache, folders):
    config = _config(tmp_path, "run", _pair(folders, tmp_path), "eval.dnc_scorer=owlv2-dinov2",
                     "eval.dnc_options={checkpoint: tiny-random, threshold: 0.0}")  # fmt: skip
    result = personalize(config, progress=False)
    evaluated = [r for r in result.history if "eval/dnc" in r]
    assert [r["step"] for r in evaluated] == [0, 2]
    assert all(0 <= r["eval/dnc"] <= 1 and "eval/mixed" not in r for r in evaluated)  # OWLv2 cannot tell


def test_shapes_subject_sets_resolve_to_folders_with_masks(cache):
    from diffalign.personalize import resolve_subjects, world_words

    specs = resolve_subjects(load_personalize_config(None, ["subject_set=shapes-similar-1"]))
    assert [(ident, cls) for ident, cls, _ in specs] == [("zog", "circle"), ("mib", "circle")]
    assert all(str(cache) in folder for _, _, folder in specs)
    loaded = load_subjects(specs, reserved=world_words("shapes"))  # identifiers pass the word rules
    assert all(len(item.images) == 4 and all(m is not None for m in item.masks) for item in loaded)
    again = resolve_subjects(load_personalize_config(None, ["subject_set=shapes-similar-1"]))
    assert again == specs  # written once, then read from the cache


def test_segmix_on_the_shapes_model_logs_exact_dnc(tmp_path, cache):
    config = load_personalize_config(None, [
        "model=shapes", "subject_set=shapes-similar-1", "mode=segmix", "steps=2", "save_every=2",
        "eval.every=2", "eval.num_steps=4", "prior.class_images=2", "prior.num_steps=4",
        "eval.dnc_scorer=shapes-exact", f"output_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    result = personalize(config, progress=False)
    evaluated = [r for r in result.history if "eval/dnc" in r]
    assert [r["step"] for r in evaluated] == [0, 2]
    assert all({"eval/dnc", "eval/all_present", "eval/mixed"} <= set(r) for r in evaluated)
    assert (tmp_path / "run" / "dnc_curve.png").is_file()


def test_cli_default_subjects_on_shapes_are_the_first_similar_pair(tmp_path, cache, capsys):
    from diffalign.cli import main

    out = tmp_path / "run"
    code = main(["personalize", "--output-dir", str(out), "--no-progress", "--set", "steps=1",
                 "--set", "prior.enabled=false", "--set", "eval.num_steps=2", "--set", "eval.images_per_prompt=1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "subjects.json").read_text())
    assert record["subject_set"] == "shapes-similar-1"
    assert [s["token"] for s in record["subjects"]] == ["zog circle", "mib circle"]


def test_the_loss_curve_is_a_running_mean_of_the_training_records():
    from diffalign.personalize import running_means

    history = [{"step": 0, "eval/dnc": 0.0}] + [{"step": i, "loss": float(i)} for i in range(1, 5)]
    smoothed = running_means(history, ["loss", "prior_loss"], 2)
    assert smoothed == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 2.5},
                        {"step": 4, "loss": 3.5}]  # fmt: skip


def test_the_vae_key_picks_the_subject_sets_vae_for_its_model_only(tmp_path):
    from diffalign.personalize import chosen_vae

    shapes = load_personalize_config(None, ["model=shapes", "subject_set=shapes-similar-1"])
    assert chosen_vae(shapes) == "shapes-vae-marked"  # the shipped VAE cannot draw markings
    own = load_personalize_config(None, ["model=shapes", "subject_set=shapes-similar-1", "vae=''"])
    assert chosen_vae(own) == ""
    tiny = load_personalize_config(None, [*TINY, "subject_set=shapes-similar-1"])
    assert chosen_vae(tiny) == ""  # shapes-vae-marked is made for `shapes`, not for the test model
    with pytest.raises(ConfigError, match="Did you mean 'shapes-vae-marked'"):
        load_personalize_config(None, ["model=shapes", "vae=shapes-vae-marks"])
