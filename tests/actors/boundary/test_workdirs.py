"""Working dirs: private to their uid, and removed whatever the sandbox did to them."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import traceback
from pathlib import Path

import pytest

from sandboxd.actors.boundary.identities import Identity
from sandboxd.actors.boundary.workdirs import (
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    FS_IOC_GETFLAGS,
    make_base_dir,
    make_working_dir,
    remove_tree,
    unreachable,
)
from tests.actors.boundary.conftest import needs_root

UID = 655900


def test_a_working_dir_is_private_to_its_uid(base_dir: Path) -> None:
    needs_root()
    path = base_dir / "sb"
    make_working_dir(path, Identity(UID, UID))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, UID, 0o700)
    # Again (a sandbox started again): same owner and mode, whatever happened meanwhile.
    path.chmod(0o755)
    make_working_dir(path, Identity(UID, UID))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_a_link_in_place_of_the_working_dir_is_not_followed(base_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (base_dir / "sb").symlink_to(elsewhere)
    with pytest.raises(OSError) as caught:
        make_working_dir(base_dir / "sb", Identity(UID, UID))
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.stat(elsewhere).st_uid == 0


def test_the_base_dir_lets_sandboxes_through_but_not_look(tmp_path: Path) -> None:
    base = tmp_path / "a" / "sandboxes"
    make_base_dir(base)
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o711
    base.chmod(0o755)
    make_base_dir(base)  # an existing one is tightened
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o711


def test_unreachable_names_the_ancestor_in_the_way(base_dir: Path) -> None:
    locked = base_dir / "locked"
    (locked / "inner").mkdir(parents=True)
    locked.chmod(0o700)
    try:
        reason = unreachable(locked / "inner" / "sandboxes")
        assert reason is not None and reason.startswith(f"{locked} is mode 0700")
        locked.chmod(0o711)
        assert unreachable(locked / "inner" / "sandboxes") is None
    finally:
        locked.chmod(0o755)


# -- removal -------------------------------------------------------------------------------


def build_hostile_tree(root: Path, outside: Path) -> None:
    """What a sandbox can leave behind: locked dirs, links out, a deep and a wide tree."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "file").write_text("x")
    (root / "a" / "b" / "c").chmod(0)
    (root / "a" / "b").chmod(0)
    (root / "readonly").mkdir()
    (root / "readonly" / "file").write_text("x")
    (root / "readonly").chmod(0o500)
    (root / "link-out").symlink_to(outside)
    (root / "link-file").symlink_to(outside / "keep")
    (root / "dangling").symlink_to("/nonexistent")
    os.mkfifo(root / "fifo")
    wide = root / "wide"
    wide.mkdir()
    for i in range(300):
        (wide / f"d{i}").mkdir()
        (wide / f"f{i}").write_text("x")


def make_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep me")
    return outside


def test_remove_tree_removes_what_a_sandbox_left(tmp_path: Path) -> None:
    outside = make_outside(tmp_path)
    root = tmp_path / "sandbox"
    root.mkdir()
    build_hostile_tree(root, outside)
    remove_tree(root)
    assert not root.exists()
    assert (outside / "keep").read_text() == "keep me"  # no link was followed


def test_remove_tree_as_the_owner_that_locked_itself_out(base_dir: Path) -> None:
    """The daemon not root (run_as daemon): chmod 000 binds it, so modes must be fixed."""
    outside = make_outside(base_dir)
    home = base_dir / "home"  # the daemon's own base dir: its uid owns it
    home.mkdir()
    os.chown(home, UID, UID)
    root = home / "sandbox"
    # Build and remove it as its owner: a forked child that takes that uid. It runs
    # only this module's code, already imported, and leaves with os._exit.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(UID, UID, UID)
            os.setresuid(UID, UID, UID)
            root.mkdir()
            build_hostile_tree(root, outside)
            if not os.access(root / "a" / "b", os.R_OK):  # locked out, as meant
                remove_tree(root)
                code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not root.exists()
    assert (outside / "keep").read_text() == "keep me"


def _supports_flags(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytearray(8), True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_remove_tree_clears_immutable_and_append_only_flags(tmp_path: Path) -> None:
    needs_root()
    chattr = shutil.which("chattr")
    if chattr is None or not _supports_flags(tmp_path):
        pytest.skip("needs chattr and a file system with inode flags")
    root = tmp_path / "sandbox"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "file").write_text("x")
    (root / "append").mkdir()
    (root / "append" / "log").write_text("x")
    try:
        subprocess.run([chattr, "+i", str(root / "locked" / "file")], check=True)
        subprocess.run([chattr, "+i", str(root / "locked")], check=True)
        subprocess.run([chattr, "+a", str(root / "append")], check=True)
        with pytest.raises(PermissionError):
            (root / "locked" / "file").unlink()  # the flags hold even against root
        remove_tree(root)
        assert not root.exists()
    finally:
        if root.exists():
            subprocess.run([chattr, "-R", "-i", "-a", str(root)], check=False)


def test_remove_tree_of_a_deep_tree(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    # Deeper than Python's recursion limit and than a descriptor per level would allow.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=fd)
    current = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    for _ in range(3000):
        os.mkdir("d", dir_fd=current)
        deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = deeper
    os.close(current)
    remove_tree(root)
    assert not root.exists()


def test_remove_tree_of_nothing_and_of_a_link(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")
    remove_tree(tmp_path / "absent" / "too")  # a working dir whose base is gone: nothing to do
    outside = make_outside(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert not link.is_symlink() and (outside / "keep").exists()


def test_flag_constants_match_the_kernels() -> None:
    assert (FS_IMMUTABLE_FL, FS_APPEND_FL) == (0x10, 0x20)
