"""The stream format: the facts about Moshi's token streams that every part of the package uses.

Audio is mono 24 kHz; Mimi turns every 80 ms frame (1920 samples) into one code per codebook, so
frames run at 12.5 Hz. A conversation is ``[17, T]`` codes per file: row 0 the text stream, rows
1-8 Moshi's (left channel) codebooks 0-7, rows 9-16 the user's (right channel) codebooks 0-7.
Text id 3 is PAD and 0 EPAD (end of padding, before a word); -1 is moshi's zero token (no
embedding, no loss), used for padding and missing streams.
"""

from __future__ import annotations

import math

SAMPLE_RATE = 24_000  # Hz, Mimi's audio
FRAME_RATE = 12.5  # frames per second (80 ms each)
FRAME_SIZE = 1920  # samples per frame: SAMPLE_RATE / FRAME_RATE
NUM_CODEBOOKS = 8  # Mimi codebooks per speaker that Moshi models
NUM_STREAMS = 1 + 2 * NUM_CODEBOOKS  # text + Moshi's codebooks + the user's codebooks = 17
TOKENS_PER_FRAME = 1 + NUM_CODEBOOKS  # the tokens a frame is scored on: text + Moshi's 8
TEXT_PAD = 3  # text padding id
TEXT_EPAD = 0  # end-of-padding id (the frame before a word starts)
ZERO_TOKEN = -1  # moshi's zero token: no embedding, no loss


def frames_for_duration(duration_sec: float) -> int:
    """Frames in ``duration_sec`` seconds, rounded up (moshi-finetune's window length)."""
    return max(1, math.ceil(duration_sec * FRAME_RATE - 1e-9))
