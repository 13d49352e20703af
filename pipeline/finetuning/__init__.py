"""Stage three: the backbone of a head's features fine-tuned together with the head, on clips decoded from the videos.

clips.py (feature rows -> frames by seeking, clip augmentation, decode workers), model.py (backbone + head, what is
trained), train.py (`finetune`: the run, its outputs and its checkpoints).
"""
