"""Labelled evaluation tasks: UCF101, HMDB51, a folder of class sub-folders, or videos + a labels CSV.

Each loader returns a Task: class names and train/test lists of (video id, path, label), plus the
videos a split names that are not on disk (reported, never a crash). Video ids are paths relative
to the data root, as in the cache.
"""
import collections
import csv
import os
import random
import re
from dataclasses import dataclass, field

from pipeline.common.config import UCF_GROUPS
from pipeline.common.errors import TaskError
from pipeline.extract.decode import VIDEO_EXTENSIONS


@dataclass
class Task:
    name: str
    split: str
    root: str
    classes: list
    train: list  # [(video_id, path, label)]
    test: list
    missing: list = field(default_factory=list)  # video ids named by the split but not on disk
    # not on the test side though listed nowhere: their source group is on the train side
    left_out: list = field(default_factory=list)

    def __post_init__(self):
        # a video on both sides of a split (or twice on one) would leak the answer into the probe
        seen = set()
        for vid, _, _ in self.train + self.test:
            if vid in seen:
                where = "both train and test" if vid in {v for v, _, _ in self.train} and \
                    vid in {v for v, _, _ in self.test} else "twice"
                raise TaskError(f"{self.root}: video {vid!r} is listed in {where} of {self.name} split {self.split}")
            seen.add(vid)

    def describe(self):
        text = (f"{self.name} split {self.split}: {len(self.classes)} classes, {len(self.train)} train / "
                f"{len(self.test)} test videos")
        if self.missing:
            text += f"; {len(self.missing)} listed but missing on disk (e.g. {', '.join(self.missing[:3])})"
        if self.left_out:
            text += (f"; {len(self.left_out)} left out of the test side: clips of a source whose other clips are on "
                     f"the train side (e.g. {', '.join(self.left_out[:3])})")
        return text


def _read_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [l.strip() for l in f if l.strip()]  # the official UCF101 lists have CRLF endings
    except FileNotFoundError:
        raise TaskError(f"{path}: split file not found") from None


def _locate(root, rel):
    """A split entry's file: DATA/<Class>/<file> as listed, else the file directly under DATA."""
    for candidate in (os.path.join(root, rel), os.path.join(root, os.path.basename(rel))):
        if os.path.isfile(candidate):
            return candidate
    return None


def _resolve(root, entries):
    found, missing = [], []
    for rel, label in entries:
        path = _locate(root, rel)
        if path is None:
            missing.append(rel)
        else:
            found.append((os.path.relpath(path, root).replace(os.sep, "/"), path, label))
    return found, missing


def _check_root(root):
    if not os.path.isdir(root):
        raise TaskError(f"{root}: data folder does not exist")


def load_ucf101(root, split=1, splits_dir=None):
    """classInd.txt (1-based), trainlistNN.txt ('Class/v_x.avi label'), testlistNN.txt ('Class/v_x.avi')."""
    root, splits_dir = locate_official("ucf101", root, splits_dir)
    index = {}
    for line in _read_lines(os.path.join(splits_dir, "classInd.txt")):
        number, name = line.split()
        index[name] = int(number) - 1
    classes = [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]
    train_entries = [(l.split()[0], int(l.split()[1]) - 1) for l in _read_lines(os.path.join(splits_dir, f"trainlist0{split}.txt"))]
    test_entries = []
    for l in _read_lines(os.path.join(splits_dir, f"testlist0{split}.txt")):
        cls = l.split("/")[0]
        if cls not in index:
            raise TaskError(f"testlist0{split}.txt: class {cls!r} is not in classInd.txt")
        test_entries.append((l, index[cls]))
    return _official_task("ucf101", root, split, classes, train_entries, test_entries)


def load_hmdb51(root, split=1, splits_dir=None):
    """<class>_test_split<N>.txt: 'file.avi 1' = train, '2' = test, '0' = unused."""
    root, splits_dir = locate_official("hmdb51", root, splits_dir)
    files = sorted(f for f in os.listdir(splits_dir) if f.endswith(f"_test_split{split}.txt"))
    if not files:
        raise TaskError(f"{splits_dir}: no *_test_split{split}.txt files")
    classes = [f[:-len(f"_test_split{split}.txt")] for f in files]
    train_entries, test_entries = [], []
    for label, (cls, f) in enumerate(zip(classes, files)):
        for line in _read_lines(os.path.join(splits_dir, f)):
            name, which = line.split()
            if which == "1":
                train_entries.append((f"{cls}/{name}", label))
            elif which == "2":
                test_entries.append((f"{cls}/{name}", label))
    return _official_task("hmdb51", root, split, classes, train_entries, test_entries)


def load_folder(root, test_fraction=0.3, seed=0, train_list=None, test_list=None, group_pattern=UCF_GROUPS):
    """One sub-folder per class. A seeded, stratified split, or explicit lists of relative paths."""
    _check_root(root)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise TaskError(f"{root}: needs at least two class sub-folders, found {len(classes)}")
    videos = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in os.walk(os.path.join(root, cls)):
            for f in sorted(files):
                if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                    path = os.path.join(dirpath, f)
                    videos.append((os.path.relpath(path, root).replace(os.sep, "/"), path, label))
    return _split("folder", root, classes, videos, [], test_fraction, seed, train_list, test_list, group_pattern)


def load_csv(root, labels, column, id_column="id", test_fraction=0.3, seed=0, train_list=None, test_list=None,
             group_pattern=UCF_GROUPS):
    """Videos under root, labels in a CSV (one row per video: its path relative to root, its class).

    One set of videos can carry several label columns (e.g. object and motion); every column is its
    own task over the same decoded frames and features. Rows with an empty label are left out.
    """
    _check_root(root)
    try:
        with open(labels, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise TaskError(f"{labels}: labels file not found") from None
    for name in (id_column, column):
        if name not in header:
            raise TaskError(f"{labels}: no column {name!r} (columns: {', '.join(header) or 'none'})")
    rows = [(r[id_column].strip(), r[column].strip()) for r in rows if r[column] and r[column].strip()]
    counts = collections.Counter(rel for rel, _ in rows)
    twice = [rel for rel, n in counts.items() if n > 1]
    if twice:
        raise TaskError(f"{labels}: {len(twice)} video(s) have more than one row (e.g. {twice[0]!r})")
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        raise TaskError(f"{labels}: column {column!r} needs at least two classes, found {len(classes)}")
    videos, missing = _resolve(root, [(rel, classes.index(label)) for rel, label in rows])
    return _split(f"csv-{column}", root, classes, videos, missing, test_fraction, seed, train_list, test_list,
                  group_pattern)


def compile_group_pattern(group_pattern):
    try:
        return re.compile(group_pattern) if group_pattern else None
    except re.error as e:
        raise TaskError(f"--group-pattern {group_pattern!r} is not a valid regular expression ({e})") from None


def group_of(video_id, pattern):
    """The source a video was cut from: the pattern's first group (or match) in its file name; a file
    name that does not match is a group of its own."""
    m = pattern.search(os.path.basename(video_id)) if pattern else None
    return (m.group(1) if m.groups() else m.group(0)) if m else video_id


def _split(name, root, classes, videos, missing, test_fraction, seed, train_list, test_list, group_pattern=None):
    """A Task from (id, path, label) triples: explicit train/test id lists, else a seeded split,
    stratified by class, that keeps each group (file names sharing group_pattern's first group, or
    its match) on one side; a file name that does not match is a group of its own."""
    if train_list or test_list:
        return _listed_split(name, root, classes, videos, missing, train_list, test_list, group_pattern)
    train, test = stratified_split(videos, len(classes), test_fraction, seed, group_pattern)
    split = f"seed{seed}-test{test_fraction}" + (f"-groups{group_pattern}" if group_pattern else "")
    return Task(name, split, root, classes, train, test, missing)


def _listed_split(name, root, classes, videos, missing, train_list, test_list, group_pattern):
    """A Task from explicit id lists. Groups stay whole here too: with --train-list alone the test side
    is every other video except those whose group is on the train side (left out, and said so); two
    lists that put one group on both sides are refused."""
    pattern = compile_group_pattern(group_pattern)
    everything = {v[0]: v for v in videos}
    train_ids = _read_lines(train_list) if train_list else []
    train_groups = {group_of(i, pattern) for i in train_ids}
    left_out = []
    if test_list:
        test_ids = _read_lines(test_list)
        # (a video listed on both sides is the Task's own refusal, with its own message)
        both = sorted({group_of(i, pattern) for i in test_ids if i not in set(train_ids)} & train_groups)
        if both:
            raise TaskError(f"{test_list}: {len(both)} source group(s) also on the train side of {train_list}, "
                            f"e.g. {both[0]!r} (clips of one source would leak the answer); fix the lists, or pass "
                            f"--group-pattern '' if the file names do not mean one source")
    else:
        rest = [i for i in everything if i not in set(train_ids)]
        test_ids = [i for i in rest if group_of(i, pattern) not in train_groups]
        left_out = [i for i in rest if group_of(i, pattern) in train_groups]
    missing = missing + [i for i in train_ids + test_ids if i not in everything]
    return Task(name, "lists", root, classes, [everything[i] for i in train_ids if i in everything],
                [everything[i] for i in test_ids if i in everything], missing, left_out)


def stratified_split(videos, num_classes, test_fraction, seed, group_pattern):
    """(train, test) of (id, path, label) triples: per class, a seeded share of its groups to test."""
    pattern = compile_group_pattern(group_pattern)
    by_class = collections.defaultdict(lambda: collections.defaultdict(list))  # label -> group -> videos
    for v in videos:
        by_class[v[2]][group_of(v[0], pattern)].append(v)
    rng = random.Random(seed)
    train, test = [], []
    for label in range(num_classes):
        groups = sorted(by_class[label].values())
        rng.shuffle(groups)
        n_test = max(1, round(len(groups) * test_fraction)) if len(groups) > 1 else 0
        test += [v for g in groups[:n_test] for v in g]
        train += [v for g in groups[n_test:] for v in g]
    return sorted(train), sorted(test)


# The official releases: the folders their archives unpack to, and where to get them. Used to find
# the data in the layouts people have, and to tell them what to fetch when it is not there.
OFFICIAL = {
    "ucf101": dict(name="UCF101", videos="UCF-101", splits="ucfTrainTestlist", has_splits=lambda d: os.path.isfile(
        os.path.join(d, "classInd.txt")), get="UCF101.rar (videos) and UCF101TrainTestSplits-RecognitionTask.zip "
        "(splits) from https://www.crcv.ucf.edu/data/UCF101.php"),
    "hmdb51": dict(name="HMDB51", videos="hmdb51_org", splits="testTrainMulti_7030_splits", has_splits=lambda d: any(
        f.endswith("_test_split1.txt") for f in os.listdir(d)), get="hmdb51_org.rar (videos; unpack the per-class "
        ".rar files inside it too) and test_train_splits.rar (splits) from "
        "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"),
}


def default_root(task):
    """Where a benchmark is looked for without --root: $VIDISTILL_DATA/<task>, else data/<task>."""
    return os.path.join(os.environ.get("VIDISTILL_DATA", "data"), task)


def locate_official(task, root, splits_dir=None):
    """(video folder, split-file folder) of UCF101 or HMDB51 under root, in the layouts people have:
    ROOT/UCF-101/<Class>/ beside ROOT/ucfTrainTestlist/ as the archives unpack; the same one level
    deeper (ROOT/UCF101/UCF-101/, ROOT/UCF101TrainTestSplits-RecognitionTask/ucfTrainTestlist/); or ROOT
    itself holding the class folders, split files beside or inside it."""
    o = OFFICIAL[task]
    children = sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []
    video_dirs = [os.path.join(root, o["videos"])] + [os.path.join(c, o["videos"]) for c in children]
    videos = next((d for d in video_dirs if os.path.isdir(d)), root)
    split_dirs = ([splits_dir] if splits_dir else
                  [os.path.join(root, o["splits"])] + [os.path.join(c, o["splits"]) for c in children]
                  + [os.path.join(videos, o["splits"]), os.path.join(os.path.dirname(os.path.abspath(videos)), o["splits"]),
                     root])
    splits = next((d for d in split_dirs if os.path.isdir(d) and o["has_splits"](d)), None)
    if not os.path.isdir(root):
        raise not_found(task, root, "folder does not exist")
    if splits is None:
        raise not_found(task, root, f"no {o['name']} split files found")
    return videos, splits


def _official_task(name, root, split, classes, train_entries, test_entries):
    """A Task of the listed videos that are on disk; the others are reported, unless none is there."""
    train, missing_train = _resolve(root, train_entries)
    test, missing_test = _resolve(root, test_entries)
    if not train and not test:
        raise not_found(name, root, f"none of the {len(missing_train + missing_test)} videos of split {split} is there")
    return Task(name, str(split), root, classes, train, test, missing_train + missing_test)


def not_found(task, root, what):
    """One line: what is wrong with root, the layout expected, and where the official data comes from."""
    o = OFFICIAL[task]
    return TaskError(f"{root}: {what}; expected {o['name']} as ROOT/{o['videos']}/<class>/<video> beside "
                     f"ROOT/{o['splits']}/ (or each one level deeper, as the archives unpack); get {o['get']}, "
                     f"then pass --root ROOT or set VIDISTILL_DATA (default root: data/{task}/)")


def load_task(name, root, split=1, splits_dir=None, test_fraction=0.3, seed=0, train_list=None, test_list=None,
              labels=None, label_column=None, id_column="id", group_pattern=UCF_GROUPS):
    if name == "ucf101":
        return load_ucf101(root, split, splits_dir)
    if name == "hmdb51":
        return load_hmdb51(root, split, splits_dir)
    if name == "folder":
        return load_folder(root, test_fraction, seed, train_list, test_list, group_pattern)
    if name == "csv":
        if not labels or not label_column:
            raise TaskError("the csv task needs --labels FILE.csv and --label-column NAME")
        return load_csv(root, labels, label_column, id_column, test_fraction, seed, train_list, test_list, group_pattern)
    raise TaskError(f"unknown task {name!r}; choose ucf101, hmdb51, folder or csv")
