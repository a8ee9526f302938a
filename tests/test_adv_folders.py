"""``--adv DIR``: a folder stands for every adversarial set in it (issue 20.2), alongside repeated ``--adv FILE``."""

from __future__ import annotations

import shutil

import pytest
import torch

from igd_cli.adv_files import adversarial_sets_in, expand_adv
from igd_cli.artifacts import save_artifact
from igd_cli.errors import IgdError

from .test_evaluate import _mask_file, target  # noqa: F401  (module fixture)


def _set(path, n=4):
    x = torch.zeros(n, 1, 8, 8)
    return save_artifact(path, "adversarial", {"x_adv": x, "y": torch.zeros(n, dtype=torch.int64),
                                               "index": torch.arange(n)}, {"attack": path.stem})


def test_expand_adv_keeps_files_and_opens_folders(tmp_path):
    d = tmp_path / "adv"
    d.mkdir()
    b, a = _set(d / "b.safetensors"), _set(d / "a.safetensors")
    save_artifact(d / "mask.safetensors", "mask", {"mask": torch.ones(2, 2, dtype=torch.uint8)}, {})
    (d / "notes.txt").write_text("not a set")
    (d / "a.safetensors.lock").write_text("")
    (d / "sub").mkdir()
    _set(d / "sub" / "c.safetensors")  # not recursive: a sub-folder is not read
    other = _set(tmp_path / "z.safetensors")
    assert adversarial_sets_in(d) == [a, b]
    # a folder expands in place, files stay as given; a file named again through its folder counts once
    assert expand_adv([other, d, a]) == [other, a, b]
    assert expand_adv([]) == []
    missing = tmp_path / "nope.safetensors"
    assert expand_adv([missing]) == [missing]  # checked where it is loaded, with the loader's message


@pytest.mark.parametrize("content", ["empty", "no-sets"])
def test_a_folder_without_sets_is_one_error_line(tmp_path, cli, content):
    d = tmp_path / "adv"
    d.mkdir()
    if content == "no-sets":
        save_artifact(d / "mask.safetensors", "mask", {"mask": torch.ones(2, 2, dtype=torch.uint8)}, {})
    with pytest.raises(IgdError, match="a folder without adversarial sets"):
        expand_adv([d])
    r = cli("defend-eval", "--mask", tmp_path / "missing-mask.safetensors", "--adv", d)
    assert r.code == 2 and r.err.strip() == (f"error: --adv {d}: a folder without adversarial sets (no .safetensors "
                                             f"of kind adversarial in it)")


def test_a_corrupt_file_in_the_folder_is_an_error_not_skipped(tmp_path):
    d = tmp_path / "adv"
    d.mkdir()
    _set(d / "a.safetensors")
    (d / "broken.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(IgdError, match="broken.safetensors: not a readable safetensors file"):
        expand_adv([d])


def test_defend_eval_with_a_folder_equals_repeated_files(tmp_path, cli, target):  # noqa: F811
    mask = _mask_file(tmp_path / "mask.safetensors", target)
    d = tmp_path / "sets"
    d.mkdir()
    common = ["--n-examples", "8", "--device", "cpu"]
    for attack, budget in (("pgd", ["--steps", "2"]), ("fgsm", [])):
        r = cli("attack", "--attack", attack, *budget, *common, "--out", d / f"{attack}.safetensors")
        assert r.code == 0, r.err
    shutil.copy(mask, d / "mask-copy.safetensors")  # other artifacts in the folder are passed over
    by_files = cli("defend-eval", "--mask", mask, "--adv", d / "fgsm.safetensors", "--adv", d / "pgd.safetensors",
                   *common, "--json")
    by_folder = cli("defend-eval", "--mask", mask, "--adv", d, *common, "--json")
    assert by_files.code == 0 and by_folder.code == 0, by_folder.err
    jf, jd = by_files.json(), by_folder.json()
    assert set(jd["robust_accuracy"]) == {"tr-pgd", "tr-fgsm"}
    for key in ("clean_accuracy", "robust_accuracy", "base_robust_accuracy", "worst_case"):
        assert jd[key] == jf[key]
    # one set only: the folder's figures differ from the two-set worst case unless it is the same set
    one = cli("defend-eval", "--mask", mask, "--adv", d / "fgsm.safetensors", *common, "--json").json()
    assert set(one["robust_accuracy"]) == {"tr-fgsm"}
