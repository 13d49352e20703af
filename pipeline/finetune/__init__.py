"""Stage three: the backbone of a head's features fine-tuned together with the head, on clips decoded from the videos.

clips.py (feature rows -> frames by seeking, clip augmentation, decode workers), model.py (backbone + head, what is
trained), train.py (`finetune`: the run, its outputs and its checkpoints). Calling the package runs `train.finetune`.
"""

from pipeline import _callable_stage

_callable_stage(__name__)
