"""`extract --videos LIST`: videos named by a list file instead of found in a folder.

Large datasets come as lists (Kinetics CSVs, `find` output). A list gives the same (id, path) pairs a
folder walk gives, so ids, resume, sharding and failure records work the same way:

- `.txt`: one path per line; blank lines and lines starting with `#` are skipped; surrounding spaces
  are stripped.
- `.csv` (with a header row): the paths are in the column named `path`, else `id` (eval's default
  `--id-column`, so one labels file serves both), else the first column. A file whose first row
  already names a video (a video extension, no such column names) is read as having no header.
- A relative path is relative to the list's folder, not to where the command runs; absolute paths
  are taken as they are.
- The id is the path relative to the list's folder when the file lies inside it (`find . -name
  '*.mp4' > list.txt` in DIR gives the ids `extract --videos DIR` gives), else the absolute path.
- A path listed twice (after normalisation: `./a.mp4`, `a.mp4` and `/abs/DIR/a.mp4` are one) is
  extracted once; a path that does not exist is kept, so extraction records it as failed (no such
  file: `cache info` lists it, `--strict` exits 1, `--retry-failed` tries it again once it is
  there); a folder is skipped. Each is reported with its line number, never fatal.
"""
import csv
import os
import sys

from pipeline.common.errors import ExtractError
from pipeline.extract.decode import VIDEO_EXTENSIONS

LIST_EXTENSIONS = (".txt", ".csv")
PATH_COLUMNS = ("path", "id")  # a CSV's path column: the first of these present (any case), else the first column


def is_video_list(path):
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in LIST_EXTENSIONS


def read_video_list(list_path):
    """([(video_id, path)] sorted by id, [problem lines]) for a .txt or .csv list of video paths."""
    base = os.path.dirname(os.path.abspath(list_path))
    found, first_line, problems = {}, {}, []
    for line_no, raw in list_entries(list_path):
        path = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(base, raw))
        vid = video_id(base, path)
        if vid in found:
            problems.append(f"line {line_no}: {raw!r} is listed again (first on line {first_line[vid]}); extracted once")
            continue
        if os.path.isdir(path):
            problems.append(f"line {line_no}: {raw!r} is a folder, not a video; skipped (pass the folder itself "
                            "as --videos to search it)")
            continue
        if not os.path.lexists(path):
            problems.append(f"line {line_no}: {raw!r} does not exist; recorded as failed")
        elif not os.path.exists(path):
            problems.append(f"line {line_no}: {raw!r} is a broken symbolic link; recorded as failed")
        found[vid], first_line[vid] = path, line_no
    return sorted(found.items()), problems


def video_id(base, path):
    """POSIX path relative to the list's folder when inside it, else the absolute path."""
    rel = os.path.relpath(path, base)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return os.path.abspath(path).replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def list_entries(list_path):
    """[(line number, path as written)] of a list file, in file order."""
    with open(list_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        if list_path.lower().endswith(".csv"):
            return _csv_entries(f)
        return [(n, line.strip()) for n, line in enumerate(f, 1)
                if line.strip() and not line.lstrip().startswith("#")]


def _csv_entries(f):
    rows = list(csv.reader(f))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(name) for name in PATH_COLUMNS if name in header), 0)
    headerless = column == 0 and not set(PATH_COLUMNS) & set(header) and \
        os.path.splitext(header[0])[1] in VIDEO_EXTENSIONS if header else False
    start = 0 if headerless else 1
    return [(n, row[column].strip()) for n, row in enumerate(rows[start:], start + 1)
            if len(row) > column and row[column].strip()]


def find_videos(root, unlisted=None):
    """Sorted [(video_id, path)] of candidate videos under root; ids are POSIX paths relative to root.

    Follows directory symlinks but never the same real directory twice (symlink loops terminate).
    Broken symlinks and unreadable files are still listed: extraction records why they failed.
    Folders that cannot be listed are appended to `unlisted` as (path, reason), never skipped silently.
    A .txt or .csv root is a list of video paths instead (read_video_list above: ids relative to the
    list's folder).
    """
    if not os.path.exists(root):
        raise ExtractError(f"{root}: video folder does not exist")
    if is_video_list(root):
        return listed_videos(root)
    if not os.path.isdir(root):
        raise ExtractError(f"{root}: not a folder (pass the folder that contains the videos, or a "
                           f"{' or '.join(LIST_EXTENSIONS)} list of video paths)")
    found, seen_dirs = [], set()

    def cannot_list(err):
        if unlisted is not None:
            unlisted.append((err.filename, err.strerror or str(err)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    if not found:
        if unlisted:
            raise ExtractError(f"{unlisted[0][0]}: cannot list the folder ({unlisted[0][1]})")
        raise ExtractError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return sorted(found)


def listed_videos(list_path):
    """find_videos for a .txt / .csv list (read_video_list): its duplicates, missing files and
    folders are reported on stderr, never fatal."""
    found, problems = read_video_list(list_path)
    for line in problems[:20]:
        print(f"note: {list_path}: {line}", file=sys.stderr)
    if len(problems) > 20:
        print(f"note: {list_path}: … and {len(problems) - 20} more", file=sys.stderr)
    if not found:
        raise ExtractError(f"{list_path}: no video paths in the list")
    return found
