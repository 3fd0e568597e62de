"""Behaviour models of the synthetic REACT data: per-frame latent trajectories of speakers and
listeners (channels ``LATENT``), from which ``pipeline.data.synth`` renders faces, voices and labels.

Two models, chosen with ``reactdiff synth --behaviour``:

* ``prototype`` (the default; the demo and tests): every speaker follows one of three smooth
  prototype trajectories (mood, head motion, speech bursts) plus own variation; the listener
  reacts 5–15 frames later in one of three styles (mirror, complementary, dampened), so one
  speaker behaviour has several appropriate reactions. Appropriate = same speaker prototype.
* ``backchannel``: a different generator, for checking that a model's gains are not tuned to
  the first one. Speakers belong to one of four groups that share a *conversation* (turn-taking
  rhythm, tone, emphasis moments) rather than a trajectory; each listener back-channels to the
  partner 0.2–0.8 s later with an individual temperament: smiles that grow with the partner's
  talk and tone, brow raises at the partner's emphasis onsets, nods (head pitch at ≈ 2 Hz)
  while the partner talks, stillness in the partner's pauses. Appropriate = same speaker group.
* ``contagion``: a third generator, written after the model's design was settled and never used
  to choose it. A group's conversation is a sequence of discrete moods (neutral, amused,
  concerned, surprised) that switch every 2–8 s; speakers show them with their own intensity.
  Listeners catch the mood causally with a ≈ 1 s time constant (``contagious``) or show only its
  strong moments (``reserved``), and nod when the partner's turn ends. Appropriate = same group.

Every draw is keyed by (seed, purpose, ids) (``rng``), so a clip's content does not depend on
how many clips there are or which worker drew it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.data.react import FPS

LATENT = ("mouth", "smile", "brow", "frown", "eyes", "yaw", "pitch", "roll")
MOUTH, SMILE, BROW, FROWN, EYES, YAW, PITCH, ROLL = range(len(LATENT))

# Purposes for independent random streams (see ``rng``).
PLAN, PROTO, PERSON, LOOK, REACT, LABELS, VOICE, FACE_MODEL = range(8)


def rng(seed: int, purpose: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, *ids]))


# ---------------------------------------------------------------------------------------------
# Building blocks: smooth signals, speech, blinks


def _smooth(rng: np.random.Generator, frames: int, channels: int, fmin: float = 0.04,
            fmax: float = 0.35, components: int = 4) -> np.ndarray:
    """[T, C] smooth zero-mean signals of roughly unit amplitude: sums of slow sinusoids."""
    t = np.arange(frames) / FPS
    freq = rng.uniform(fmin, fmax, (components, channels))
    phase = rng.uniform(0, 2 * np.pi, (components, channels))
    amp = rng.uniform(0.5, 1.0, (components, channels))
    x = (amp[None] * np.sin(2 * np.pi * freq[None] * t[:, None, None] + phase[None])).sum(1)
    return x / np.sqrt((amp ** 2).sum(0) / 2)[None]


def _hann_smooth(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    w = np.hanning(width + 2)[1:-1]
    w /= w.sum()
    pad = np.pad(x, [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    if x.ndim == 1:
        return np.convolve(pad, w, mode="valid")
    return np.stack([np.convolve(pad[:, c], w, mode="valid") for c in range(x.shape[1])], 1)


def _speech_bursts(rng: np.random.Generator, frames: int) -> np.ndarray:
    """[T] speech envelope in [0, 1]: talk spurts of 1-4 s separated by 0.3-1.5 s pauses."""
    env = np.zeros(frames)
    t = int(rng.integers(0, 20))
    while t < frames:
        length = int(rng.uniform(1.0, 4.0) * FPS)
        env[t:t + length] = rng.uniform(0.6, 1.0)
        t += length + int(rng.uniform(0.3, 1.5) * FPS)
    return np.clip(_hann_smooth(env, 5), 0, 1)


def _blinks(rng: np.random.Generator, frames: int) -> np.ndarray:
    """[T] eye opening in [0.05, 1] with a blink every 2.5-6 s."""
    eyes = np.ones(frames)
    profile = np.array([0.55, 0.1, 0.05, 0.3, 0.75])
    t = int(rng.integers(5, 60))
    while t < frames:
        n = min(len(profile), frames - t)
        eyes[t:t + n] = np.minimum(eyes[t:t + n], profile[:n])
        t += int(rng.uniform(2.5, 6.0) * FPS)
    return eyes


# ---------------------------------------------------------------------------------------------
# The "prototype" model

_MOODS = np.array([[0.45, 0.10, -0.25],    # cheerful
                   [-0.20, -0.10, 0.45],   # serious
                   [0.10, 0.45, -0.05]])   # animated / surprised


def prototype_behaviour(p: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    """Speaker prototype ``p``: smooth expression [T,3], head pose [T,3] and speech envelope [T]."""
    r = rng(seed, PROTO, p)
    mood = _MOODS[p % len(_MOODS)] if p < len(_MOODS) else r.uniform(-0.3, 0.4, 3)
    expression = mood[None] + 0.4 * _smooth(r, frames, 3)
    pose = _smooth(r, frames, 3, 0.05, 0.3 + 0.15 * p) * np.array([0.22, 0.10, 0.07])
    return {"expression": expression, "pose": pose, "speech": _speech_bursts(r, frames)}


def speaker_latent(proto: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[T, 8] speaker latent: the prototype + own variation, syllable rhythm and blinks."""
    frames = len(proto["speech"])
    t = np.arange(frames) / FPS
    z = np.zeros((frames, len(LATENT)))
    z[:, SMILE:FROWN + 1] = proto["expression"] + 0.12 * _smooth(rng, frames, 3)
    z[:, YAW:] = proto["pose"] + 0.04 * _smooth(rng, frames, 3)
    rate, phase = rng.uniform(3.5, 5.0), rng.uniform(0, 2 * np.pi)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rate * t + phase + 0.8 * np.sin(2 * np.pi * 0.3 * t))
    return _talking(z, proto["speech"], syllables, 0.15, rng)


def _talking(z: np.ndarray, speech: np.ndarray, syllables: np.ndarray, floor: float,
             rng: np.random.Generator) -> np.ndarray:
    """A speaker's mouth (speech envelope × syllable rhythm) and blinks; the latent, clipped."""
    z[:, MOUTH] = speech * (floor + (1 - floor) * syllables)
    z[:, EYES] = _blinks(rng, len(z))
    return _clip_latent(z)


def _delayed(speaker: np.ndarray, lag: int) -> np.ndarray:
    """The speaker's latent ``lag`` frames later (the first frame repeated; short clips clamp the lag)."""
    lag = min(lag, len(speaker) - 1)
    return np.concatenate([np.repeat(speaker[:1], lag, 0), speaker[:len(speaker) - lag]])


def listener_latent(speaker: np.ndarray, style: str, lag: int, rng: np.random.Generator) -> np.ndarray:
    """[T, 8] reaction ``lag`` frames after the speaker, in one of ``REACTION_STYLES``."""
    frames = len(speaker)
    t = np.arange(frames) / FPS
    s = _delayed(speaker, lag)
    speech = np.clip(_hann_smooth(s[:, MOUTH], 9) * 1.6, 0, 1)       # how much the speaker talks
    z = np.zeros_like(speaker)
    if style == "mirror":            # copies the speaker's expression and head motion
        z[:, SMILE:FROWN + 1] = 0.85 * s[:, SMILE:FROWN + 1]
        z[:, YAW:] = s[:, YAW:] * np.array([-0.6, 0.6, -0.6])
    elif style == "complementary":   # encouraging: smiles while the speaker talks, nods, concern for frowns
        z[:, SMILE] = 0.7 * speech - 0.5 * s[:, FROWN] - 0.1
        z[:, BROW] = 0.6 * s[:, FROWN] - 0.3 * s[:, SMILE]
        z[:, FROWN] = -0.4 * s[:, SMILE]
        z[:, PITCH] = 0.16 * speech * np.sin(2 * np.pi * 1.6 * t)
        z[:, YAW] = 0.3 * s[:, YAW]
    elif style == "dampened":        # a faint, slow echo of the speaker
        slow = _hann_smooth(s, 15)
        z[:, SMILE:FROWN + 1] = 0.35 * slow[:, SMILE:FROWN + 1]
        z[:, YAW:] = 0.3 * slow[:, YAW:]
    else:
        raise ValueError(f"unknown reaction style {style!r} (known: {', '.join(REACTION_STYLES)})")
    z[:, SMILE:FROWN + 1] += 0.08 * _smooth(rng, frames, 3)
    z[:, YAW:] += 0.03 * _smooth(rng, frames, 3)
    z[:, MOUTH] = 0.06 + 0.08 * np.clip(_smooth(rng, frames, 1, 0.1, 0.6)[:, 0], 0, None)  # back-channel
    z[:, EYES] = _blinks(rng, frames)
    return _clip_latent(z)


def _clip_latent(z: np.ndarray) -> np.ndarray:
    z[:, MOUTH] = np.clip(z[:, MOUTH], 0, 1)
    z[:, SMILE:FROWN + 1] = np.clip(z[:, SMILE:FROWN + 1], -1, 1)
    z[:, EYES] = np.clip(z[:, EYES], 0.05, 1)
    z[:, YAW:] = np.clip(z[:, YAW:], -0.6, 0.6)
    return z



# ---------------------------------------------------------------------------------------------
# The "backchannel" model

_TONES = np.array([[0.35, 0.05, -0.25],    # warm
                   [-0.15, 0.10, 0.35],    # worried
                   [0.05, 0.40, 0.00],     # excited
                   [0.00, -0.10, 0.05]])   # flat


def _turns(r: np.random.Generator, frames: int, talkativeness: float) -> np.ndarray:
    """[T] speech envelope: turns of 1.5–6 s (longer when talkative) and 0.4–2.5 s pauses."""
    env = np.zeros(frames)
    t = int(r.integers(0, 30))
    while t < frames:
        length = int(r.uniform(1.5, 2.0 + 4.0 * talkativeness) * FPS)
        env[t:t + length] = r.uniform(0.5, 1.0)
        t += length + int(r.uniform(0.4, 2.5 - 1.5 * talkativeness) * FPS)
    return np.clip(_hann_smooth(env, 7), 0, 1)


def group_conversation(g: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    """Shared by the speakers of group ``g``: tone [T, 3], speech turns [T], emphasis [T], pose [T, 3]."""
    r = rng(seed, PROTO, 100 + g)
    tone = _TONES[g % len(_TONES)][None] + 0.3 * _smooth(r, frames, 3, 0.02, 0.15)
    speech = _turns(r, frames, talkativeness=(g % 4) / 3)
    onsets = np.flatnonzero(np.diff(speech > 0.3, prepend=0) > 0)
    emphasis = np.zeros(frames)
    for o in onsets:                                     # a stressed word soon after each turn starts
        at = min(frames - 1, o + int(r.integers(3, 20)))
        emphasis[at] = r.uniform(0.6, 1.0)
    emphasis = np.clip(_hann_smooth(emphasis, 11) * 4.0, 0, 1)
    pose = _smooth(r, frames, 3, 0.03, 0.2) * np.array([0.15, 0.08, 0.05])
    return {"tone": tone, "speech": speech, "emphasis": emphasis, "pose": pose}


def backchannel_speaker(conv: dict[str, np.ndarray], r: np.random.Generator) -> np.ndarray:
    """[T, 8] a speaker of a group: the group's conversation with own gain, syllables and blinks."""
    frames = len(conv["speech"])
    t = np.arange(frames) / FPS
    z = np.zeros((frames, len(LATENT)))
    z[:, SMILE:FROWN + 1] = r.uniform(0.7, 1.2) * conv["tone"] + 0.15 * _smooth(r, frames, 3)
    z[:, BROW] += 0.5 * conv["emphasis"]
    z[:, YAW:] = conv["pose"] + 0.05 * _smooth(r, frames, 3)
    z[:, PITCH] += 0.08 * conv["emphasis"]               # head dips on stressed words
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * r.uniform(3.0, 5.5) * t + r.uniform(0, 2 * np.pi))
    return _talking(z, conv["speech"], syllables, 0.2, r)


def backchannel_listener(speaker: np.ndarray, style: str, lag: int, r: np.random.Generator) -> np.ndarray:
    """[T, 8] back-channel reaction ``lag`` frames after the partner, with a personal temperament."""
    frames = len(speaker)
    t = np.arange(frames) / FPS
    s = _delayed(speaker, lag)
    talking = np.clip(_hann_smooth(s[:, MOUTH], 13) * 1.8, 0, 1)
    emphasis = np.clip(s[:, BROW] - _hann_smooth(s[:, BROW], 51), 0, None)     # the partner's brow peaks
    warmth, expressiveness, nod_rate = r.uniform(0.5, 1.0), r.uniform(0.6, 1.3), r.uniform(1.6, 2.4)
    z = np.zeros_like(speaker)
    z[:, SMILE] = expressiveness * (0.5 * talking * (0.4 + s[:, SMILE]) + 0.3 * warmth * _hann_smooth(s[:, SMILE], 25))
    z[:, BROW] = expressiveness * (1.2 * emphasis + 0.2 * _hann_smooth(s[:, FROWN], 25))
    z[:, FROWN] = 0.5 * _hann_smooth(s[:, FROWN], 25) - 0.2 * warmth * talking
    z[:, PITCH] = 0.12 * expressiveness * talking * np.sin(2 * np.pi * nod_rate * t)
    z[:, YAW] = 0.25 * s[:, YAW] + 0.03 * _smooth(r, frames, 1)[:, 0]
    z[:, ROLL] = 0.03 * _smooth(r, frames, 1)[:, 0]
    z[:, SMILE:FROWN + 1] += 0.06 * _smooth(r, frames, 3)
    z[:, MOUTH] = 0.05 + 0.2 * (1 - talking) * np.clip(_smooth(r, frames, 1, 0.2, 0.8)[:, 0], 0, None)
    z[:, EYES] = _blinks(r, frames)
    return _clip_latent(z)


# ---------------------------------------------------------------------------------------------
# The "contagion" model

_STATES = np.array([[0.0, 0.0, 0.0],       # neutral   (smile, brow, frown)
                    [0.55, 0.15, -0.3],    # amused
                    [-0.25, 0.0, 0.5],     # concerned
                    [0.1, 0.6, 0.0]])      # surprised
_STATE_POSE = np.array([[0.0, 0.0, 0.0],   # head (yaw, pitch, roll) offset of each mood
                        [0.0, -0.05, 0.06],
                        [0.0, 0.06, -0.08],
                        [0.0, -0.1, 0.0]])


def mood_sequence(g: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    """Shared by group ``g``'s speakers: a one-hot mood per frame [T, 4] (2–8 s segments) and turns [T]."""
    r = rng(seed, PROTO, 200 + g)
    states = np.zeros((frames, len(_STATES)))
    t, current = 0, int(r.integers(len(_STATES)))
    while t < frames:
        length = int(r.uniform(2.0, 8.0) * FPS)
        states[t:t + length, current] = 1.0
        # Each group prefers one mood (g mod 4) and returns to it half of the time.
        current = g % len(_STATES) if r.random() < 0.5 else int(r.integers(len(_STATES)))
        t += length
    return {"states": states, "speech": _speech_bursts(r, frames)}


def _causal_follow(x: np.ndarray, tau_frames: float) -> np.ndarray:
    """First-order low-pass along time (exponential smoothing): reacts only to the past."""
    a = 1.0 / max(1.0, tau_frames)
    out = np.empty_like(x)
    acc = x[0]
    for i in range(len(x)):
        acc = acc + a * (x[i] - acc)
        out[i] = acc
    return out


def contagion_speaker(conv: dict[str, np.ndarray], r: np.random.Generator) -> np.ndarray:
    """[T, 8] a speaker showing the group's moods with personal intensity, quick onsets and noise."""
    frames = len(conv["speech"])
    t = np.arange(frames) / FPS
    moods = _hann_smooth(conv["states"], int(r.integers(5, 13)))     # 0.2–0.5 s transitions
    z = np.zeros((frames, len(LATENT)))
    z[:, SMILE:FROWN + 1] = r.uniform(0.7, 1.3) * moods @ _STATES + 0.1 * _smooth(r, frames, 3)
    z[:, YAW:] = moods @ _STATE_POSE + _smooth(r, frames, 3, 0.05, 0.4) * np.array([0.12, 0.05, 0.04])
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * r.uniform(3.0, 5.0) * t + r.uniform(0, 2 * np.pi))
    return _talking(z, conv["speech"], syllables, 0.15, r)


def contagion_listener(speaker: np.ndarray, style: str, lag: int, r: np.random.Generator) -> np.ndarray:
    """[T, 8] a listener catching the partner's mood ``lag`` frames later; nods at turn ends."""
    frames = len(speaker)
    s = _delayed(speaker, lag)
    expression = _causal_follow(s[:, SMILE:FROWN + 1], r.uniform(15, 35))
    z = np.zeros_like(speaker)
    if style == "contagious":
        z[:, SMILE:FROWN + 1] = r.uniform(0.6, 0.9) * expression
    elif style == "reserved":        # only the strong moments come through
        z[:, SMILE:FROWN + 1] = 1.4 * np.sign(expression) * np.clip(np.abs(expression) - 0.25, 0, None)
    else:
        raise ValueError(f"unknown contagion style {style!r} (known: contagious, reserved)")
    talking = _hann_smooth(s[:, MOUTH], 15) > 0.12
    ends = np.flatnonzero(np.diff(talking.astype(int)) < 0)          # the partner stops talking
    nod = np.zeros(frames)
    shape = np.sin(np.linspace(0, 2 * np.pi, 13)) * np.hanning(13)
    for e in ends:
        n = min(len(shape), frames - e - 1)
        nod[e + 1:e + 1 + n] += shape[:n]
    z[:, PITCH] = 0.15 * nod + 0.02 * _smooth(r, frames, 1)[:, 0]
    z[:, YAW] = -0.3 * s[:, YAW] + 0.03 * _smooth(r, frames, 1)[:, 0]
    z[:, ROLL] = 0.5 * _causal_follow(s[:, ROLL], 25.0)
    z[:, SMILE:FROWN + 1] += 0.06 * _smooth(r, frames, 3)
    z[:, MOUTH] = 0.05 + 0.1 * np.clip(_smooth(r, frames, 1, 0.1, 0.5)[:, 0], 0, None)
    z[:, EYES] = _blinks(r, frames)
    return _clip_latent(z)


# ---------------------------------------------------------------------------------------------
# Registry


class Behaviour:
    """One behaviour model: how many speaker groups, the listener styles and lags, and the draws."""

    def __init__(self, name: str, groups: int, styles: tuple[str, ...], lags: tuple[int, int],
                 group: Callable, speaker: Callable, listener: Callable):
        self.name, self.groups, self.styles, self.lags = name, groups, styles, lags
        self.group, self.speaker, self.listener = group, speaker, listener


BEHAVIOURS = {
    "prototype": Behaviour("prototype", 3, ("mirror", "complementary", "dampened"), (5, 15),
                           prototype_behaviour, speaker_latent, listener_latent),
    "backchannel": Behaviour("backchannel", 4, ("backchannel",), (5, 20),
                             group_conversation, backchannel_speaker, backchannel_listener),
    "contagion": Behaviour("contagion", 4, ("contagious", "reserved"), (10, 30),
                           mood_sequence, contagion_speaker, contagion_listener),
}
