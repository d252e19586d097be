"""Run dirs: a rejected run removes only what its own command created, never the user's files."""

from conftest import run_metarun, tiny_args
from test_robustness import assert_clean_error

from metarun.runner import rundir


def user_folder(folder):
    """A folder of the user's, with files of the names a run writes."""
    (folder / "tensorboard" / "old_run").mkdir(parents=True)
    (folder / "tensorboard" / "old_run" / "events.out.tfevents.123").write_text("old events")
    (folder / "resolved.yaml").write_text("mine: 1\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "n.txt").write_text("notes")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_rejected_run_in_an_existing_folder_leaves_the_users_files(tiny_root, tmp_path):
    proj = tmp_path / "proj"
    mine = user_folder(proj)
    proc = run_metarun(*tiny_args(tiny_root, proj, "way=200"), cwd=tmp_path)
    assert_clean_error(proc, "way=200 is larger than")
    left = {str(p.relative_to(proj)): p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    assert left == mine  # nothing of the user's deleted, nothing of the rejected run left


def test_clean_up_removes_what_the_claim_found_absent_only(tmp_path):
    proj = tmp_path / "proj"
    mine = user_folder(proj)
    claim = rundir.claim(proj, auto=False)
    assert claim.path == proj and claim.created is None
    # what a run writes before it is rejected: its own files beside and inside the user's
    (proj / ".hydra").mkdir()
    (proj / ".hydra" / "config.yaml").write_text("way: 200\n")
    (proj / "tensorboard" / "events.out.tfevents.456").write_text("new events")
    (proj / "metarun-train.log").write_text("error\n")
    rundir.remove_unused(claim)
    left = {str(p.relative_to(proj)): p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    assert left == mine and not (proj / ".hydra").exists()


def test_clean_up_of_a_created_dir_removes_it_and_its_new_parents(tmp_path):
    claim = rundir.claim(tmp_path / "outputs" / "train" / "t", auto=True)
    assert claim.created == tmp_path / "outputs"
    (claim.path / "resolved.yaml").write_text("x")
    rundir.remove_unused(claim)
    assert list(tmp_path.iterdir()) == []
