"""Errors and warnings of the data sources, and the checks that raise them.

* :class:`DataError` / :class:`DataWarning`: bad data (stop) / a bad file that was skipped.
* :func:`check_split` and :func:`check_index`: the ``split`` and ``index`` checks every dataset makes.
* :class:`ClassFolderChecks`: what the class-folder datasets (``image_folder``, ``video_folder``,
  ``audio_folder``, ``av_folder``) share: scanning ``root/<class>/...`` and reporting bad files, either one
  :class:`DataError` naming them or (skipping) one :class:`DataWarning` per file, and counting the samples
  that another file stood in for (``skipped_samples``, shared with loader worker processes).
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterator

MAX_LISTED = 20  # bad files (or class folders) named in one error message
SPLITS = ("train", "eval")


class DataError(Exception):
    """Data that cannot be used: a missing root, no class folders, a non-image or corrupt file.

    The message always names the offending path. Raised in a data-loader worker, it reaches the main process
    as ``DataError("Caught DataError in DataLoader worker ...<traceback>")``: only the original message is kept.
    """

    def __init__(self, *args: Any):
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught DataError in DataLoader"):
            args = (args[0].rsplit("DataError: ", 1)[-1].strip(),)
        super().__init__(*args)


class DataWarning(UserWarning):
    """A bad file that was skipped (``skip_bad``); the message names the file and the reason."""


def check_split(tag: str, split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS` (``tag``: the dataset, for the message)."""
    if split not in SPLITS:
        raise ValueError(f"{tag}: unknown split {split!r} (known: {', '.join(SPLITS)})")


def check_index(tag: str, index: int, length: int) -> int:
    """``index`` as an int in ``0 .. length - 1`` (negative counts from the end); ``IndexError`` when out of range."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"{tag}: index {index} out of range for length {length}")
    return index


def normalise_extensions(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """File extensions as ``.ext`` in lower case (``"PNG"`` -> ``".png"``); ``ValueError`` on an empty one."""
    out = tuple(("." + e.lower().lstrip(".")) for e in extensions)
    if any(e == "." for e in out):
        raise ValueError("empty extension")
    return out


def _visible(names: list[str]) -> list[str]:
    """Sorted ``names`` without hidden ones (starting with '.', e.g. ``.DS_Store``)."""
    return sorted(n for n in names if not n.startswith("."))


class ClassFolderChecks:
    """Mixin of the class-folder datasets: scanning ``root/<class>/...`` and reporting bad files.

    The dataset sets ``params`` (with ``num_classes`` and ``extensions``), ``root``, ``bad`` (``{path: why}``)
    and, after :meth:`_scan`, ``classes`` and ``samples``; it names itself in ``tag``, its files in ``what``
    (``"image"``, ``"video"``, ...) and says in :attr:`_skip_bad` whether bad files are skipped and in
    ``skip_hint`` how to ask for that.
    """

    tag: ClassVar[str] = ""
    what: ClassVar[str] = ""  # "image" / "video" / "audio": the word in messages
    leaf: ClassVar[str] = "file"  # the file in "(expected root/<class>/<file>)"
    skip_hint: ClassVar[str] = ""  # how to skip bad files, e.g. "set skip_bad to skip"

    params: Any
    root: Path
    bad: dict[str, str]
    classes: list[str]
    samples: list[tuple[str, int]]

    def _open(self, params: Any, split: str) -> None:
        """Check ``split``; set ``params``, ``split``, ``root`` (``eval_root`` for ``eval`` when set) and ``bad``."""
        check_split(self.tag, split)
        self.params, self.split = params, split
        self.root = Path(params.eval_root if split == "eval" and params.eval_root else params.root).expanduser()
        self.bad = {}
        self._substituted = multiprocessing.Value("q", 0)  # shared memory: loader workers (forked) add to it

    @property
    def skipped_samples(self) -> int:
        """Samples so far (in this process and its loader workers) whose own file was bad, so the next
        file that loads stood in: logged as ``skipped_samples`` in the run's metrics."""
        return int(self._substituted.value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:  # a plain pickle, not a worker start: a copy
            state["_substituted"] = self.skipped_samples
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self._substituted, int):
            self._substituted = multiprocessing.Value("q", self._substituted)

    @property
    def _skip_bad(self) -> bool:
        """Whether bad files are skipped (warned about once) rather than stopping with a DataError."""
        raise NotImplementedError

    @property
    def _a_what(self) -> str:
        return ("an " if self.what[:1] in "aeiou" else "a ") + self.what

    def _scan(self) -> tuple[list[str], list[tuple[str, int]]]:
        """Class folders (sorted; index = label) and ``[(path, label), ...]`` of the files with a wanted
        extension; raises DataError on a bad root or class count, reports the other files as bad."""
        p = self.params
        if not self.root.exists():
            raise DataError(f"{self.tag}: root {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.tag}: root {str(self.root)!r} is not a directory")
        entries = _visible(os.listdir(self.root))
        classes = [n for n in entries if (self.root / n).is_dir()]
        if not classes:
            raise DataError(f"{self.tag}: no class sub-folders in {str(self.root)!r} "
                            f"(expected root/<class>/<{self.leaf}>)")
        if len(classes) != p.num_classes:
            shown = ", ".join(classes[:MAX_LISTED]) + (", ..." if len(classes) > MAX_LISTED else "")
            raise DataError(f"{self.tag}: {str(self.root)!r} has {len(classes)} class folders ({shown}) "
                            f"but num_classes is {p.num_classes}")
        bad = [(str(self.root / n), "file outside any class folder") for n in entries if n not in classes]
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            found = 0
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = _visible(dirnames)
                for fn in _visible(filenames):
                    path = os.path.join(dirpath, fn)
                    if os.path.splitext(fn)[1].lower() in p.extensions:
                        samples.append((path, label))
                        found += 1
                    else:
                        bad.append((path, f"not {self._a_what} file (extension not in {list(p.extensions)})"))
            if not found:
                raise DataError(f"{self.tag}: class folder {str(self.root / name)!r} holds no {self.what} files "
                                f"with extensions {list(p.extensions)}")
        self._report(bad)
        return classes, samples

    def _keep(self, good: list[tuple[str, int]], bad: list[tuple[str, str]], usable: str) -> None:
        """Report ``bad``, keep ``good`` as the samples; DataError when a class has no ``usable`` file left."""
        self._report(bad)
        self.samples = good
        missing = sorted(set(range(len(self.classes))) - {y for _, y in good})
        if missing:
            raise DataError(f"{self.tag}: no {usable} left in class folder(s) "
                            f"{[str(self.root / self.classes[y]) for y in missing]}")

    def _report(self, bad: list[tuple[str, str]]) -> None:
        """Raise one DataError naming the bad files, or (skipping) warn once per file and record it."""
        if not bad:
            return
        if not self._skip_bad:
            lines = [f"  {path}: {why}" for path, why in bad[:MAX_LISTED]]
            more = [f"  ... and {len(bad) - MAX_LISTED} more"] if len(bad) > MAX_LISTED else []
            raise DataError(f"{self.tag}: bad files ({self.skip_hint} them):\n" + "\n".join(lines + more))
        for path, why in bad:
            self._skip(path, why)

    def _skip(self, path: str, why: str) -> None:
        """Record ``path`` as bad and warn about it, once per file."""
        if path not in self.bad:
            self.bad[path] = why
            warnings.warn(f"{self.tag}: skipping {path}: {why}", DataWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------ load
    def sample_shape(self) -> Any:
        return self.params.sample_shape()

    def __len__(self) -> int:
        return len(self.samples)

    def _candidates(self, index: int) -> Iterator[tuple[str, int]]:
        """``(path, label)`` of sample ``index`` (in range: see :func:`check_index`), then of the next ones in
        order, wrapping around, passing over the files found bad so far: the loader tries each until one loads
        (deterministic). Raises DataError when none is left."""
        n, counted = len(self.samples), False
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            if path not in self.bad:
                if k and not counted:  # the sample's own file is bad: counted once per sample drawn
                    counted = True
                    with self._substituted.get_lock():
                        self._substituted.value += 1
                yield path, label
        raise DataError(f"{self.tag}: no file under {str(self.root)!r} could be decoded")
