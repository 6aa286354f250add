"""Files and folders written whole or not at all, so a killed or racing run never leaves half a result.

`write_json` for one file, `atomic_folder` for a folder (a stage checkpoint, a pairs folder, a
merged model, sampled frames): the content is written into a temporary folder of this process
beside the target and renamed into place at the end (`publish_folder`). An existing target is
replaced only when asked, and a target another run published meanwhile is never removed.
"""
import contextlib
import json
import os
import shutil
import tempfile


class RunError(RuntimeError):
    """A run that cannot go on as asked (an output another run holds, --resume with other arguments);
    the message says what and why."""


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path, obj, overwrite=True):
    """Atomic JSON write: a temporary file of this process (two runs writing one path must not
    share it), then renamed. overwrite=False refuses an existing `path` (RunError), atomically:
    of two runs publishing one file, exactly one succeeds. (os.urandom, not `random`: a save must not
    move the run's seeded RNG.)"""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    with open(tmp, "x") as f:
        json.dump(obj, f, indent=2, default=str)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails when path exists, unlike a rename
    except OSError as e:  # path exists, or a file system without hard links: then check, and rename
        if isinstance(e, FileExistsError) or os.path.exists(path):
            raise RunError(f"{path}: already exists (another run wrote it); pass --overwrite to replace it") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_folder(tmp, final, overwrite=False):
    """Rename the finished folder `tmp` to `final`. An existing `final` is replaced only with
    `overwrite` (moved aside first, removed once the new one is in place); otherwise RunError, and
    `tmp` is kept so that nothing is lost: another run published `final` after this one started."""
    if os.path.exists(final):
        if not overwrite:
            raise RunError(f"{final}: another run wrote it while this one ran; this run's result is in {tmp}")
        old = f"{final}.old.{os.getpid()}.{os.urandom(4).hex()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:  # created meanwhile (a non-empty folder cannot be renamed over)
        raise RunError(f"{final}: another run wrote it while this one ran; this run's result is in {tmp}") from None


@contextlib.contextmanager
def atomic_folder(final, overwrite=False, prefix=None):
    """`with atomic_folder(out) as tmp:` write into `tmp`; when the block ends the folder is published
    at `out` (publish_folder), when it raises `tmp` is removed. `tmp` is this process's own folder
    beside `out` (two runs into one place never share one), named `<out>.tmp...` or `prefix...`."""
    final = os.path.abspath(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or os.path.basename(final) + ".tmp", dir=os.path.dirname(final))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final, overwrite)
