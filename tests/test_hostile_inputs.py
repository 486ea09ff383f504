"""Hostile inputs: commands a careless (or hostile) user might type, each of which must fail cleanly.

Every row of ``ROWS`` is one command line and a fragment of the message it must print. For each row the
test asserts: a non-zero exit status, the fragment in the output, no ``Traceback``, and that no file that
existed before the run (in the shared setup and in the row's own folder) changed or disappeared.

Adding a row (any script: SDXL/FLUX trainers, captioners, VLM tools, ...)::

    Case("my_script_bad_flag", "my_script.py --model {M} --output_dir {W}/out --bad 1", "--bad: unknown option"),

- ``command`` is the script path relative to the repository root, then its arguments. Placeholders:
  ``{M}`` tiny SD1 model folder, ``{IMG}`` four captioned images, ``{DS}`` dataset TOML over them,
  ``{OUT}`` a finished LoRA run named ``l`` (``l.safetensors``, ``l-step00000002.safetensors``, states),
  ``{STATE}`` its step-2 state, ``{W}`` the row's own empty folder (also the working directory), and
  ``{TN}`` the issue's ``train_network.py`` prefix (model, dim 4, 2 steps, seed 0, ``--output_name l``).
- ``setup=lambda work, s: ...`` prepares files in ``work`` first (never change the shared files: copy them;
  ``hostile.copy_state`` makes a hand-edited, re-hashed state folder).
- ``forbid=("...",)`` fragments that must not appear; ``watch=("{W}/..",)`` extra folders to hash.
- Rows run in this process (fast); ``subprocess=True`` runs ``python script`` instead; ``slow=True`` marks a
  row the default run skips. A script whose rows need other shared files (a tiny SDXL model, a VLM) builds
  them in its own session fixture and defines its own list and parametrized test with ``check_case``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest

from tests.hostile import Case, Setup, build_setup, check_case, copy_state, edit_progress, write_code_pickle


def _victim(work: Path, s: Setup) -> None:
    (work / "victim.safetensors").write_bytes(b"the user's own file")


def _foreign_run(work: Path, s: Setup) -> None:
    (work / "other").mkdir()
    (work / "other" / "l.safetensors").write_bytes(b"another run's LoRA")


def _toml(text: str) -> Callable:
    def make(work: Path, s: Setup) -> None:
        (work / "data.toml").write_text(f"[general]\ncaption_extension = '.txt'\nbatch_size = 2\n{text}\n"
                                        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{s.images.as_posix()}'\n",
                                        encoding="utf-8")
    return make


def _state_edit(edit: Callable[[Path], None]) -> Callable:
    return lambda work, s: copy_state(s.state, work / "state", edit) and None


def _replace_file(name: str, write: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: write(folder / name)


def _tiny_flux(folder: Path) -> None:
    from library.models.flux.tiny import save_tiny_flux_files

    save_tiny_flux_files(folder)


def _tiny_sd3(folder: Path, variant: str) -> None:
    from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files

    save_tiny_sd3_files(folder, TinySD3Config(variant=variant))


def _tiny_sd3_with_clip_g(work: Path) -> None:
    """A tiny SD3 and a file with the header of a full-size CLIP-G (1280 wide)."""
    import torch
    from safetensors.torch import save_file

    _tiny_sd3(work / "sd3", "medium")
    save_file({"text_model.embeddings.position_embedding.weight": torch.zeros(77, 1280, dtype=torch.float16)},
              str(work / "clip_g.safetensors"))


def _caption_folder(work: Path, s: Setup) -> None:
    import shutil

    shutil.copytree(s.images, work / "img")
    (work / "img" / "green.txt").unlink()
    (work / "img" / "green.txt").mkdir()
    (work / "data.toml").write_text(f"[general]\nresolution = 64\ncaption_extension = '.txt'\n[[datasets]]\n"
                                    f"[[datasets.subsets]]\nimage_dir = '{(work / 'img').as_posix()}'\n"
                                    "class_tokens = 'sks'\n", encoding="utf-8")


def _old_style_folder(work: Path, s: Setup) -> None:
    import shutil

    shutil.copytree(s.images, work / "data" / "1_sks circle")


def _nan_lora(work: Path, s: Setup) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(s.run / "l.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(work / "nan.safetensors"))


def _latents_metadata(work: Path, s: Setup) -> None:
    import json

    (work / "meta.json").write_text(json.dumps({"red": {"caption": "a red circle"}}), encoding="utf-8")



def _lumina_and_t5_headers(work: Path, setup: Setup) -> None:
    """A file with a Lumina single file's header and a T5 encoder file (tiny tensors: only names are read)."""
    import torch
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    save_file({"layers.0.attention.qkv.weight": torch.zeros(4, 2), "cap_embedder.1.weight": torch.zeros(2, 2)},
              str(work / "lumina.safetensors"))
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, str(work / "t5xxl.safetensors"))

ROWS = [
    # files overwritten
    Case("output_name_is_a_path", "{TN} --dataset_config {DS} --output_dir {W}/a/b --output_name ../../victim",
         "is a path; it must be a plain name", setup=_victim),
    Case("resume_into_another_runs_folder", "{TN} --dataset_config {DS} --output_dir {W}/other --resume {STATE} "
         "--max_train_steps 3", "that the resumed run did not write", setup=_foreign_run),
    # tracebacks
    Case("output_dir_is_a_file", "{TN} --dataset_config {DS} --output_dir {IMG}/red.png", "is a file, not a folder"),
    Case("output_dir_under_a_file", "{TN} --dataset_config {DS} --output_dir {IMG}/red.png/sub",
         "which is a file, not a folder"),
    Case("output_dir_not_writable", "{TN} --dataset_config {DS} --output_dir /proc/i13-out", "is not writable"),
    Case("post_hoc_ema_output_is_a_folder", "lora_post_hoc_ema.py {OUT}/l-step00000002.safetensors "
         "{OUT}/l.safetensors --output_file {W} --overwrite", "is a folder; give a file name"),
    Case("merge_captions_output_is_a_folder", "finetune/merge_captions_to_metadata.py {IMG} {W}",
         "is a folder; give a file name"),
    Case("state_optimizer_pickle_with_code", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "would import posix.system",
         setup=_state_edit(_replace_file("optimizer.pt", write_code_pickle)), forbid=("weights_only",)),
    Case("state_rng_pickle_with_code", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "would import posix.system",
         setup=_state_edit(_replace_file("rng_0.pt", write_code_pickle)), forbid=("weights_only",)),
    Case("state_optimizer_is_text", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "optimizer.pt: cannot read this state file",
         setup=_state_edit(_replace_file("optimizer.pt", lambda p: p.write_text("not a pickle")))),
    Case("state_global_step_is_text", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "field 'global_step' must be an integer",
         setup=_state_edit(lambda f: edit_progress(f, global_step="two"))),
    # accepted silently
    Case("huge_resolution", "{TN} --dataset_config {W}/data.toml --output_dir {W}/o", "must be at most 16384",
         setup=_toml("resolution = 1000000")),
    Case("huge_num_repeats", "{TN} --dataset_config {W}/data.toml --output_dir {W}/o",
         "must be between 1 and 1,000,000", setup=_toml("resolution = 64\nnum_repeats = 1000000000")),
    Case("network_multiplier_nan", "{TN} --dataset_config {W}/data.toml --output_dir {W}/o",
         "expected a finite number", setup=_toml("resolution = 64\nnetwork_multiplier = nan")),
    Case("cli_float_nan", "{TN} --dataset_config {DS} --output_dir {W}/o --network_alpha nan",
         "must be a finite number"),
    Case("state_negative_step", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "field 'global_step' must be at least 0",
         setup=_state_edit(lambda f: edit_progress(f, global_step=-5, batches_done=999))),
    Case("state_batches_done_past_epoch", "{TN} --dataset_config {DS} --output_dir {W}/o --resume {W}/state "
         "--max_train_steps 3", "field 'batches_done' is 999",
         setup=_state_edit(lambda f: edit_progress(f, batches_done=999))),
    Case("negative_workers", "{TN} --dataset_config {DS} --output_dir {W}/o --max_data_loader_n_workers -3",
         "must be 0 or more"),
    Case("resume_past_max_train_steps", "{TN} --dataset_config {DS} --output_dir {OUT} --resume {STATE} "
         "--max_train_steps 1", "nothing left to train"),
    Case("caption_path_is_a_folder", "{TN} --dataset_config {W}/data.toml --output_dir {W}/o",
         "are folders, not caption files", setup=_caption_folder),
    Case("post_hoc_ema_same_file_twice", "lora_post_hoc_ema.py {OUT}/l.safetensors {OUT}/l.safetensors "
         "--output_file {W}/ema.safetensors", "given twice"),
    Case("post_hoc_ema_nan_tensor", "lora_post_hoc_ema.py {OUT}/l.safetensors {W}/nan.safetensors --output_file "
         "{W}/ema.safetensors", "NaN or infinite values", setup=_nan_lora),
    Case("network_args_three_problems", "{TN} --dataset_config {DS} --output_dir {W}/o "
         "--network_args conv_dim=four badkey=1 noequals", "'badkey' is not an argument"),
    # messages that point the wrong way
    Case("pretrained_ckpt_with_code", "{TN} --dataset_config {DS} --output_dir {W}/o "
         "--pretrained_model_name_or_path {W}/model.ckpt", "would import posix.system",
         setup=lambda work, s: write_code_pickle(work / "model.ckpt") and None, forbid=("weights_only",)),
    Case("network_weights_ckpt_with_code", "{TN} --dataset_config {DS} --output_dir {W}/o "
         "--network_weights {W}/lora.ckpt", "would import posix.system",
         setup=lambda work, s: write_code_pickle(work / "lora.ckpt") and None, forbid=("weights_only",)),
    Case("resolution_7", "{TN} --train_data_dir {W}/data --resolution 7 --output_dir {W}/o", "use e.g. 8x8",
         setup=_old_style_folder, forbid=("0x0",)),
    Case("prepare_latents_max_resolution_64", "finetune/prepare_buckets_latents.py {IMG} {W}/meta.json "
         "{W}/out.json {M} --max_resolution 64,64", "lower min_bucket_reso (256) to at most 64",
         setup=_latents_metadata, forbid=("raise max_bucket_reso",)),
    Case("prepare_latents_two_family_flags", "finetune/prepare_buckets_latents.py {IMG} {W}/meta.json "
         "{W}/out.json {M} --flux --lumina", "--flux and --lumina name different model families",
         setup=_latents_metadata),
    # LoRA utilities (issue 17): the same classes
    Case("merge_lora_save_to_is_a_folder", "networks/merge_lora.py --save_to {W}/dir.safetensors --models "
         "{OUT}/l.safetensors --overwrite", "is a folder; give a LoRA file name",
         setup=lambda work, s: (work / "dir.safetensors").mkdir()),
    Case("merge_lora_save_to_under_a_file", "networks/merge_lora.py --save_to {IMG}/red.png/x.safetensors "
         "--models {OUT}/l.safetensors", "is a file, not a folder"),
    Case("merge_lora_ratio_nan", "networks/merge_lora.py --save_to {W}/x.safetensors --models {OUT}/l.safetensors "
         "--ratios nan", "must be a finite number"),
    Case("merge_lora_lbws_wrong_length", "networks/merge_lora.py --save_to {W}/x.safetensors --models "
         "{OUT}/l.safetensors --lbws [1,0,1]", "must have 17 or 26 values for SD1.x LoRAs"),
    Case("merge_lora_clip_l_without_sd_model", "networks/merge_lora.py --save_to {W}/x.safetensors --models "
         "{OUT}/l.safetensors --clip_l {W}/clip_l.safetensors", "text encoder files are merged beside a model"),
    Case("merge_lora_clip_l_into_sd1", "networks/merge_lora.py --sd_model {M} --save_to {W}/x.safetensors --models "
         "{OUT}/l.safetensors --clip_l {OUT}/l.safetensors --clip_l_save_to {W}/c.safetensors",
         "models take no separate text encoder file"),
    Case("svd_merge_lora_lbws_not_json", "networks/svd_merge_lora.py --save_to {W}/x.safetensors --models "
         "{OUT}/l.safetensors --lbws 1,0,1", "give a JSON list of numbers"),
    Case("lora_state_to_train_db", "train_db.py --pretrained_model_name_or_path {M} --dataset_config {DS} "
         "--output_dir {W}/o --max_train_steps 3 --resume {STATE}", "this is a state of a lora training"),
    Case("sd1_model_to_sdxl_train_network", "sdxl_train_network.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --network_module networks.lora", "use train_network.py"),
    Case("sd1_model_to_sdxl_train", "sdxl_train.py --pretrained_model_name_or_path {M} --dataset_config {DS} "
         "--output_dir {W}/o", "use train_network.py"),
    Case("sd1_model_to_flux_train_network", "flux_train_network.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --network_module networks.lora_flux --ae {M}",
         "use train_network.py"),
    Case("sd1_model_to_sd3_train_network", "sd3_train_network.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o", "use train_network.py"),
    Case("flux_model_to_sd3_train_network", "sd3_train_network.py --pretrained_model_name_or_path "
         "{W}/flux/flux.safetensors --dataset_config {DS} --output_dir {W}/o", "use flux_train_network.py",
         setup=lambda work, s: _tiny_flux(work / "flux")),
    Case("sd3_large_with_a_medium_only_flag", "sd3_train_network.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {DS} --output_dir {W}/o --enable_scaled_pos_embed",
         "--enable_scaled_pos_embed is an SD3.5 Medium option, and this model is SD3.5 Large",
         setup=lambda work, s: _tiny_sd3(work / "sd3", "5-large")),
    Case("sd3_clip_g_file_given_as_clip_l", "sd3_train_network.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {DS} --output_dir {W}/o --clip_l {W}/clip_g.safetensors",
         "clip_g.safetensors: this file is a CLIP-G text encoder (1280 wide), not a CLIP-L text encoder; it belongs "
         "to --clip_g", setup=lambda work, s: _tiny_sd3_with_clip_g(work)),
    Case("sd3_t5_file_given_as_clip_g", "sd3_train.py --pretrained_model_name_or_path {W}/sd3/sd3.safetensors "
         "--dataset_config {DS} --output_dir {W}/o --clip_g {W}/sd3/t5xxl.safetensors",
         "t5xxl.safetensors: this file is a T5 text encoder, not a CLIP-G text encoder; it belongs to --t5xxl",
         setup=lambda work, s: _tiny_sd3(work / "sd3", "medium")),
    Case("sd3_train_freezes_more_blocks_than_the_model_has", "sd3_train.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {DS} --output_dir {W}/o --num_last_block_to_freeze 30",
         "has only 2 joint blocks", setup=lambda work, s: _tiny_sd3(work / "sd3", "medium")),
    Case("sd3_swaps_more_blocks_than_the_model_allows", "sd3_train_network.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {DS} --output_dir {W}/o --blocks_to_swap 5 "
         "--gradient_checkpointing", "this model has 2 joint blocks, and at most 0 of them can be swapped",
         setup=lambda work, s: _tiny_sd3(work / "sd3", "medium")),
    Case("sd3_buckets_larger_than_the_position_table", "sd3_train_network.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {W}/data.toml --output_dir {W}/o",
         "images up to 768 px on a side, but this SD3 Medium model's position embedding covers at most 512 px; "
         "lower max_bucket_reso to 512 or less",
         setup=lambda work, s: (_tiny_sd3(work / "sd3", "medium"),
                                _toml("resolution = 256\nenable_bucket = true\nmin_bucket_reso = 64\n"
                                      "max_bucket_reso = 768")(work, s))),
    Case("sd3_train_block_lr_for_another_depth", "sd3_train.py --pretrained_model_name_or_path "
         "{W}/sd3/sd3.safetensors --dataset_config {DS} --output_dir {W}/o --block_lr 1e-5,1e-5,1e-5",
         "--block_lr has 3 values; this SD3 Medium model has 2 joint blocks",
         setup=lambda work, s: _tiny_sd3(work / "sd3", "medium")),
    Case("sd3_train_t5_cache_only_with_frozen_clips", "sd3_train.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --use_t5xxl_cache_only",
         "--use_t5xxl_cache_only caches T5's outputs so that CLIP-L and CLIP-G can train"),
    Case("sd1_model_to_flux_train", "flux_train.py --pretrained_model_name_or_path {M} --dataset_config {DS} "
         "--output_dir {W}/o --ae {M}", "use train_network.py"),
    Case("sd1_model_to_sdxl_textual_inversion", "sdxl_train_textual_inversion.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --token_string zqx --init_word dog", "use train_network.py"),
    Case("textual_inversion_token_in_vocabulary", "train_textual_inversion.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --token_string cat --init_word dog",
         "already in the tokenizer's vocabulary"),
    Case("textual_inversion_output_name_is_a_path", "train_textual_inversion.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --token_string zqx --init_word dog --output_name ../victim",
         "is a path; it must be a plain name", setup=_victim),
    Case("vlm_data_ends_with_a_user_turn", "vlm_train.py --model_id {W}/missing --data_path {W}/bad.json "
         "--output_dir {W}/o", "bad.json line 1 (sample 1): the last turn is a user turn",
         setup=lambda work, s: (work / "bad.json").write_text(
             '[{"conversations": [{"from": "human", "value": "hi"}]}]', encoding="utf-8") and None),
    Case("vlm_deepspeed_config_is_not_json", "vlm_train.py --model_id {W}/missing --data_path {W}/missing.json "
         "--output_dir {W}/o --deepspeed {W}/ds.json", "ds.json is not valid JSON: Expecting ',' delimiter at line 1",
         setup=lambda work, s: (work / "ds.json").write_text('{"zero_optimization": {"stage": 2} "bf16": {}}',
                                                             encoding="utf-8") and None),
    Case("sd1_model_to_lumina_train_network", "lumina_train_network.py --pretrained_model_name_or_path {M} "
         "--dataset_config {DS} --output_dir {W}/o --ae {M}", "use train_network.py"),
    Case("lumina_gemma2_is_a_t5_file", "lumina_train_network.py --pretrained_model_name_or_path {W}/lumina.safetensors "
         "--gemma2 {W}/t5xxl.safetensors --dataset_config {DS} --output_dir {W}/o",
         "this file is a T5 text encoder, not a Gemma2 text encoder", setup=_lumina_and_t5_headers),
    Case("sd1_model_to_lumina_train", "lumina_train.py --pretrained_model_name_or_path {M} --dataset_config {DS} "
         "--output_dir {W}/o", "use train_network.py"),
    Case("lumina_train_blockwise_with_accumulation", "lumina_train.py --pretrained_model_name_or_path "
         "{W}/lumina.safetensors --dataset_config {DS} --output_dir {W}/o --blockwise_fused_optimizers "
         "--gradient_accumulation_steps 2", "--gradient_accumulation_steps > 1", setup=_lumina_and_t5_headers),
    Case("lumina_swaps_more_layers_than_the_model_allows", "lumina_train_network.py --pretrained_model_name_or_path "
         "{W}/lumina.safetensors --dataset_config {DS} --output_dir {W}/o --blocks_to_swap 2 "
         "--gradient_checkpointing", "this model has 1 main layer, and at most 0 of them can be swapped",
         setup=_lumina_and_t5_headers),
    Case("lumina_lora_converter_given_an_sd_lora", "networks/convert_lumina_lora_to_diffusers.py {OUT}/l.safetensors "
         "{W}/x.safetensors", "not a Lumina 2 LoRA"),
    Case("blip_training_model_not_found", "train_blip_network.py {IMG} {W}/o --model_id {W}/missing",
         "neither a model folder nor a Hugging Face id"),
]


@pytest.fixture(scope="session")
def hostile_setup(tmp_path_factory, tiny_sd1_dir) -> Setup:
    return build_setup(tmp_path_factory.mktemp("hostile"), tiny_sd1_dir)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in ROWS])
def test_hostile_input_fails_cleanly(case: Case, hostile_setup: Setup, tmp_path: Path) -> None:
    check_case(case, hostile_setup, tmp_path / "work")


def test_network_args_reports_every_problem(hostile_setup: Setup, tmp_path: Path) -> None:
    row = next(c for c in ROWS if c.id == "network_args_three_problems")
    output = check_case(row, hostile_setup, tmp_path / "work")
    for fragment in ("'noequals' is not key=value", "'badkey' is not an argument", "conv_dim='four'"):
        assert fragment in output
