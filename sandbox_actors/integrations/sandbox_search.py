"""glob and grep as deer-flow's own search helpers answer them, run inside a sandbox.

This file is both a module (the host imports :func:`find_glob`, :func:`find_grep` to test them)
and the script a sandbox runs: ``python3 -c "$SCRIPT"`` with its request as JSON in the
environment variable ``SA_SEARCH``, printing its answer as one JSON line. It uses the standard
library only, so any image with ``python3`` runs it (ours, the AIO image).

What it answers, as deer-flow's ``deerflow/sandbox/search.py`` does: paths relative to the
resolved root are matched as ``PurePosixPath.match`` matches them (from the right, one component
per pattern component, ``**`` like ``*``, and a leading ``**/`` also tried without it);
directories and files whose name is on the ignore list are skipped (hidden files are not);
grep skips symbolic links, files over 1 MB, binary files (a NUL in the first 8 KiB) and lines
over 2,000 characters, and cuts a matching line at 200 characters ("..." at the end); results
come in the order ``os.walk`` finds them, and ``truncated`` is True once ``max_results`` are
found. A missing root is FileNotFoundError, a root that is no directory NotADirectoryError
(grep also takes a file).
"""

import fnmatch
import json
import os
import re

MAX_FILE_SIZE = 1_000_000
LINE_SUMMARY = 200
LONGEST_LINE = LINE_SUMMARY * 10
BINARY_SAMPLE = 8192


def _ignorer(patterns):
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    wild = [p for p in patterns if any(c in p for c in "*?[")]
    return lambda name: name in exact or any(fnmatch.fnmatchcase(name, p) for p in wild)


def _parts(path):
    """A path's components as PurePosixPath keeps them ('' and '.' dropped)."""
    return [part for part in path.split("/") if part not in ("", ".")]


def path_matches(pattern, relative):
    """``PurePosixPath(relative).match(pattern)``, or the same without a leading ``**/``."""
    if _match(pattern, relative):
        return True
    return pattern.startswith("**/") and _match(pattern[3:], relative)


def _match(pattern, relative):
    if pattern.startswith("/"):
        return False  # an anchored pattern never matches a relative path
    wanted = _parts(pattern)
    if not wanted:
        raise ValueError("empty pattern")
    have = _parts(relative)
    if len(wanted) > len(have):
        return False
    # '**' within a component matches like '*': it never spans a '/'.
    return all(fnmatch.fnmatchcase(name, part) for name, part in zip(have[len(have) - len(wanted):], wanted))


def _root(path, files_too):
    root = os.path.realpath(path)
    if not os.path.exists(root):
        raise FileNotFoundError(root)
    if not os.path.isdir(root) and not (files_too and os.path.isfile(root)):
        raise NotADirectoryError(root)
    return root


def _walk(root, ignored):
    """(directory, its relative path, kept subdirectories, kept files), as os.walk finds them."""
    for here, dirs, files in os.walk(root):
        dirs[:] = [name for name in dirs if not ignored(name)]
        relative = os.path.relpath(here, root)
        yield here, "" if relative == "." else relative + "/", dirs, [n for n in files if not ignored(n)]


def find_glob(path, pattern, include_dirs=False, max_results=200, ignore=()):
    """Paths under ``path`` whose relative path matches ``pattern``; True when cut at ``max_results``."""
    root, ignored, matches = _root(path, False), _ignorer(ignore), []
    for here, relative, dirs, files in _walk(root, ignored):
        for name in (dirs if include_dirs else []) + files:
            if path_matches(pattern, relative + name):
                matches.append(os.path.join(here, name))
                if len(matches) >= max_results:
                    return matches, True
    return matches, False


def _candidates(root, ignored):
    if os.path.isfile(root):
        yield root, os.path.basename(root), False
        return
    for here, relative, _dirs, files in _walk(root, ignored):
        for name in files:
            yield os.path.join(here, name), relative + name, True


def _summary(line):
    line = line.rstrip("\n\r")
    return line if len(line) <= LINE_SUMMARY else line[:LINE_SUMMARY - 3] + "..."


def find_grep(path, pattern, glob=None, literal=False, case_sensitive=False, max_results=100, ignore=()):
    """[path, line number, line] of lines matching ``pattern`` in text files under ``path`` (or in
    that file), only files whose relative path matches ``glob`` when given; True when cut."""
    root, ignored, matches = _root(path, True), _ignorer(ignore), []
    regex = re.compile(re.escape(pattern) if literal else pattern, 0 if case_sensitive else re.IGNORECASE)
    for candidate, relative, in_tree in _candidates(root, ignored):
        if glob is not None and not path_matches(glob, relative):
            continue
        try:
            if in_tree and os.path.islink(candidate):
                continue
            real = os.path.realpath(candidate)
            if in_tree and not (real == root or real.startswith(root.rstrip("/") + "/")):
                continue
            if os.stat(real).st_size > MAX_FILE_SIZE or _binary(real):
                continue
            with open(real, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, start=1):
                    if len(line) > LONGEST_LINE or not regex.search(line):
                        continue
                    matches.append([real, number, _summary(line)])
                    if len(matches) >= max_results:
                        return matches, True
        except OSError:
            continue
    return matches, False


def _binary(path):
    try:
        with open(path, "rb") as handle:
            return b"\0" in handle.read(BINARY_SAMPLE)
    except OSError:
        return True


def main(request):
    """Answer one request ({"op": "glob" | "grep", ...arguments}) as a JSON-able dict."""
    op = request.pop("op")
    try:
        found, truncated = (find_glob if op == "glob" else find_grep)(**request)
    except (FileNotFoundError, NotADirectoryError) as exc:
        return {"error": type(exc).__name__, "path": str(exc)}
    return {"matches": found, "truncated": truncated}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(os.environ["SA_SEARCH"]))))
