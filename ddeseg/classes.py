"""The class lists of the datasets ddeseg reads, their aliases, the AVSS mask palette, the
drawing palettes (`display_palette`: official colours for AVSS ids, readable ones otherwise), and the
task and split names of a prepared folder.

One owner for these facts: `prepare` builds the unified class list (`ddeseg.pipelines.records.ClassList`)
from them, the synthetic generator draws with them, and `predict` names a checkpoint's classes
with them when it holds no list of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AVSS_TASKS = ("v1s", "v1m", "v2")
VPO_TASKS = ("VPO-SS", "VPO-MS", "VPO-MSMI")
ALL_TASKS = AVSS_TASKS + VPO_TASKS
SPLITS = ("train", "val", "test")

# AVSBench-semantic class names in the order of the official `label2idx.json` (id = position).
AVSS_CLASSES: tuple[str, ...] = (
    "background",
    "accordion",
    "airplane",
    "axe",
    "baby",
    "bassoon",
    "bell",
    "bird",
    "boat",
    "boy",
    "bus",
    "car",
    "cat",
    "cello",
    "clarinet",
    "clipper",
    "clock",
    "dog",
    "donkey",
    "drum",
    "duck",
    "elephant",
    "emergency-car",
    "erhu",
    "flute",
    "frying-food",
    "girl",
    "goose",
    "guitar",
    "gun",
    "guzheng",
    "hair-dryer",
    "handpan",
    "harmonica",
    "harp",
    "helicopter",
    "hen",
    "horse",
    "keyboard",
    "leopard",
    "lion",
    "man",
    "marimba",
    "missile-rocket",
    "motorcycle",
    "mower",
    "parrot",
    "piano",
    "pig",
    "pipa",
    "saw",
    "saxophone",
    "sheep",
    "sitar",
    "sorna",
    "squirrel",
    "tabla",
    "tank",
    "tiger",
    "tractor",
    "train",
    "trombone",
    "truck",
    "trumpet",
    "tuba",
    "ukulele",
    "utv",
    "vacuum-cleaner",
    "violin",
    "wolf",
    "woman",
)

# The 22 VPO classes (CAVP `config/class_list.py: index_table_coco`), task-local id = position.
VPO_CLASSES: tuple[str, ...] = (
    "background",
    "airplane",
    "baby",
    "bird",
    "bus",
    "car",
    "cat",
    "cell phone",
    "cow",
    "dog",
    "elephant",
    "female",
    "horse",
    "keyboard",
    "male",
    "motorcycle",
    "mouse",
    "sheep",
    "skateboard",
    "sports ball",
    "tennis racket",
    "zebra",
)

# COCO category id (as stored in VPO masks) -> VPO class name (CAVP `coco_class_dict`).
COCO_TO_VPO: dict[int, str] = {
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    24: "zebra",
    37: "sports ball",
    41: "skateboard",
    43: "tennis racket",
    74: "mouse",
    76: "keyboard",
    77: "cell phone",
    92: "male",
    93: "female",
    94: "baby",
}

# AVSBench-object S4 categories -> AVSS class names, only where the correspondence is clear.
# The others (coyote_howling, chainsawing_trees, playing_glockenspiel) keep their own names.
S4_TO_AVSS: dict[str, str] = {
    "ambulance_siren": "emergency-car",
    "baby_laughter": "baby",
    "cap_gun_shooting": "gun",
    "cat_meowing": "cat",
    "dog_barking": "dog",
    "driving_buses": "bus",
    "female_singing": "woman",
    "helicopter": "helicopter",
    "horse_clip-clop": "horse",
    "lawn_mowing": "mower",
    "lions_roaring": "lion",
    "male_speech": "man",
    "mynah_bird_singing": "bird",
    "playing_acoustic_guitar": "guitar",
    "playing_piano": "piano",
    "playing_tabla": "tabla",
    "playing_ukulele": "ukulele",
    "playing_violin": "violin",
    "race_car": "car",
    "typing_on_computer_keyboard": "keyboard",
}

SOUNDING_OBJECT = "sounding-object"


def avss_palette(count: int = 256) -> np.ndarray:
    """The AVSBench-semantic colour of each class id: uint8 `[count, 3]` (id 0 black).

    The colour of id `j` spreads the bits of `j` over the three channels, three bits per step,
    from the most significant bit of each channel down (the VOC palette the official
    `get_v2_pallete` builds). The one palette of ddeseg: masks are read and drawn with it.
    """
    label = np.arange(count, dtype=np.int64)
    palette = np.zeros((count, 3), dtype=np.int64)
    shift = 7
    while bool((label > 0).any()):
        for channel in range(3):
            palette[:, channel] |= ((label >> channel) & 1) << shift
        label >>= 3
        shift -= 1
    return palette.astype(np.uint8)


# Colours for drawing classes that have no official colour (the demo's synthetic classes, VPO,
# the binary tasks' foreground): the eight tab10 colours that are neither grey nor brown, then
# colours picked greedily, each the farthest in CIELAB from those before it, among colours with
# lightness 45..88 and chroma >= 35, i.e. readable over dark and light images, never near-black
# and never near the white outline. Pairwise CIE76 distance >= 27 (tests/test_visualize.py).
READABLE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (227, 119, 194),
    (188, 189, 34), (23, 190, 207), (170, 0, 255), (0, 255, 0), (255, 170, 153), (136, 102, 34),
    (255, 0, 204), (0, 102, 255), (0, 238, 187), (255, 0, 119), (187, 221, 153), (68, 119, 68),
    (204, 102, 255), (170, 238, 0), (170, 85, 102), (255, 204, 119), (187, 187, 255), (0, 238, 102),
)


def readable_palette(count: int = 256) -> np.ndarray:
    """uint8 `[count, 3]`: id 0 (background) black, ids 1.. the `READABLE_COLOURS` in order
    (repeating after 24 classes; the legends name every class)."""
    palette = np.zeros((count, 3), dtype=np.uint8)
    for class_id in range(1, count):
        palette[class_id] = READABLE_COLOURS[(class_id - 1) % len(READABLE_COLOURS)]
    return palette


def uses_avss_ids(class_names: Sequence[str] | None) -> bool:
    """True when the names are AVSBench-semantic classes at their official ids (task v2 on AVSS
    data): such masks are drawn in the official palette, so that pictures compare with papers."""
    if not class_names or len(class_names) <= 2:
        return False
    return all(i < len(AVSS_CLASSES) and AVSS_CLASSES[i] == name for i, name in enumerate(class_names))


def display_palette(class_names: Sequence[str] | None) -> np.ndarray:
    """The palette pictures of these classes are drawn in: the official AVSS palette for AVSS
    ids (`uses_avss_ids`), else `readable_palette()`."""
    return avss_palette() if uses_avss_ids(class_names) else readable_palette()
