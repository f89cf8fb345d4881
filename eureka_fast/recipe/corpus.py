"""The nano recipe's speech corpus: generated English sentences spoken by espeak-ng voices, with known labels.

What it is. A sentence generator (about 500 common English words; statements, questions, requests, lists, numbers and
times written as words, two-clause sentences; deterministic per seed) is spoken by espeak-ng voices: six English
accents (American, New York, Received Pronunciation, Scottish, Lancaster, Caribbean) times the male variants m1-m7
and the female variants f1-f5, at several pitch and speed settings, clean or with white or pink noise mixed in at a
known SNR. Whole voice variants (one male, one female: HELD_OUT_VARIANTS) and whole sentences are held out: the
held-out split is held-out variants speaking held-out sentences, and neither ever occurs in the training split.

Labels follow the rules of `eureka_fast.dataflux.synthetic`, not what espeak was asked for: gender from the variant;
pitch level from the Praat F0 median of the clean clip against the gender's bands; speaking rate from the text's
syllables over the clean clip's speech span against the captioner's syllables-per-second classes; noise "noisy" when
the mixed-in SNR is below 20 dB. Every clip is planned with a target class per attribute, balanced in each split;
when the measured label misses the target, or lands within a small margin of a class boundary (where even a perfect
listener could not tell), the pitch or speed setting is moved towards the target and the clip spoken again (at most
MAX_ATTEMPTS times). The label is always the measured one, so a clip that still misses keeps its measured label.

Files (`build_corpus(out_dir)`): out_dir/audio/{train,heldout}/<id>.wav (16 kHz mono, 16-bit) and
out_dir/corpus.jsonl, one row per clip (id, audio path relative to out_dir, split, text, voice, variant, accent, the
four labels, SNR, espeak settings, duration and the reference measurements). corpus.jsonl is written last and
atomically: a directory that has it is a finished corpus and is not rebuilt.

Your own audio instead: the later steps only read corpus.jsonl rows with "id", "audio" (relative to the corpus
directory), "split" ("train" or "heldout") and "text"; the four labels are optional (the held-out multiple-choice
and caption checks use the attributes a row has). See `eureka_fast.recipe.manifests` for the path from a folder of
wav files to training manifests.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections import Counter

import numpy as np

SAMPLE_RATE = 16000
SPLITS = ("train", "heldout")
LABELS = {"gender": ("male", "female"), "pitch_level": ("low", "medium", "high"),
          "speaking_rate": ("slow", "normal", "fast"), "noise": ("clean", "noisy")}

# espeak-ng English voices. Not "en-gb": with it the variants keep its male voice (a female variant speaks at a
# male F0), so gender would not be what the variant says.
ACCENTS = ("en-us", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-029")
VARIANTS = {"male": ("m1", "m2", "m3", "m4", "m5", "m6", "m7"), "female": ("f1", "f2", "f3", "f4", "f5")}
HELD_OUT_VARIANTS = ("m3", "f2")

# Clips per split: quick checks the wiring in seconds; full is what the recipe trains on.
SIZES = {"quick": {"train": 24, "heldout": 12}, "full": {"train": 2000, "heldout": 240}}

# First espeak settings drawn for a target class (ranges, uniform); retries move them (see _adjust).
# pitch -p per gender and class: low / medium / high F0 for the gender (cf. dataflux.synthetic.PITCH_SETTINGS)
PITCH_RANGES = {"male": {"low": (5, 22), "medium": (58, 68), "high": (88, 99)},
                "female": {"low": (12, 28), "medium": (50, 60), "high": (80, 92)}}
# Settings retries may reach: outside them the female F0 leaves Praat's female search range (100-500 Hz) and the
# reference measurement jumps an octave, which would mislabel the clip.
PITCH_LIMITS = {"male": (0, 99), "female": (12, 94)}
# speed -s (words per minute) and word gap -g (10 ms units) per rate class: about 2.3-2.6, 3.9-5.4 and 6.9-7.4
# syllables per second (fast stays near its class boundary: faster espeak speech is hard to recognise)
SPEED_RANGES = {"slow": (88, 100), "normal": (125, 170), "fast": (220, 240)}
WORD_GAPS = {"slow": 4, "normal": 0, "fast": 0}
# SNRs (dB) per noise class; None = no noise added. "noisy" is below dataflux's 20 dB clean threshold, and not far
# below it: at 5 dB Whisper tiny.en misses most words of espeak speech, which no speech model could learn from.
SNR_CHOICES = {"clean": (None, 30.0), "noisy": (10.0, 15.0)}
LEAD_SILENCE_S, TRAIL_SILENCE_S = 0.3, 0.4
PITCH_MARGIN = 0.04  # relative distance an F0 median keeps from a pitch band edge
RATE_MARGIN = 0.25  # syllables per second a rate keeps from a rate class boundary
MAX_ATTEMPTS = 4

CORPUS_FILE = "corpus.jsonl"
_CLIP_FILE = re.compile(r"^(?:train|heldout)-\d{5}-[A-Za-z0-9+-]+\.wav(?:\.tmp-\d+\.wav)?$")
SUMMARY_FILE = "corpus_summary.json"
CORPUS_VERSION = 1


class CorpusError(RuntimeError):
    """The corpus cannot be built (no espeak-ng) or the directory holds a different corpus."""


# ============================================================================================ sentences

NAMES = ("Anna", "Peter", "Maria", "David", "Sarah", "Tom", "Lucy", "James", "Emma", "Jack", "Laura", "Mark",
         "Nina", "Paul", "Rosa", "Sam", "Helen", "Oscar", "Julia", "Henry")
PEOPLE = (("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("driver", "drivers"),
          ("neighbor", "neighbors"), ("student", "students"), ("friend", "friends"), ("brother", "brothers"),
          ("sister", "sisters"), ("mother", "mothers"), ("father", "fathers"), ("baker", "bakers"),
          ("nurse", "nurses"), ("pilot", "pilots"), ("child", "children"), ("uncle", "uncles"), ("aunt", "aunts"),
          ("cousin", "cousins"), ("manager", "managers"), ("painter", "painters"))
ANIMALS = (("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("fish", "fish"),
           ("cow", "cows"), ("rabbit", "rabbits"), ("duck", "ducks"), ("sheep", "sheep"), ("mouse", "mice"),
           ("goat", "goats"), ("chicken", "chickens"))
OBJECTS = (("book", "books"), ("chair", "chairs"), ("table", "tables"), ("window", "windows"), ("door", "doors"),
           ("bottle", "bottles"), ("letter", "letters"), ("phone", "phones"), ("bag", "bags"), ("key", "keys"),
           ("cup", "cups"), ("plate", "plates"), ("lamp", "lamps"), ("box", "boxes"), ("ticket", "tickets"),
           ("picture", "pictures"), ("clock", "clocks"), ("coat", "coats"), ("shoe", "shoes"), ("hat", "hats"),
           ("ball", "balls"), ("pen", "pens"), ("map", "maps"), ("bicycle", "bicycles"), ("blanket", "blankets"),
           ("radio", "radios"), ("camera", "cameras"), ("umbrella", "umbrellas"), ("basket", "baskets"),
           ("candle", "candles"), ("glass", "glasses"), ("towel", "towels"), ("wallet", "wallets"),
           ("pillow", "pillows"), ("jacket", "jackets"), ("newspaper", "newspapers"))
FOODS = (("apple", "apples"), ("egg", "eggs"), ("orange", "oranges"), ("potato", "potatoes"),
         ("tomato", "tomatoes"), ("banana", "bananas"), ("cake", "cakes"), ("cookie", "cookies"),
         ("sandwich", "sandwiches"), ("carrot", "carrots"), ("lemon", "lemons"), ("onion", "onions"),
         ("pie", "pies"), ("peach", "peaches"), ("pear", "pears"))
MASS_FOODS = ("tea", "coffee", "milk", "water", "soup", "rice", "juice", "bread", "cheese", "butter", "sugar",
              "honey", "pasta", "chocolate")
VEHICLES = ("train", "bus", "boat", "plane", "ferry", "taxi")
PLACES = ("park", "school", "station", "market", "garden", "kitchen", "office", "library", "hospital", "beach",
          "river", "village", "city", "museum", "shop", "bank", "farm", "hotel", "church", "bridge", "forest",
          "harbor", "theater", "airport", "bakery", "corner", "hallway", "restaurant")
ADJECTIVES = ("big", "small", "old", "new", "red", "blue", "green", "yellow", "white", "black", "brown", "warm",
              "cold", "quiet", "busy", "happy", "tired", "heavy", "empty", "full", "long", "short", "bright", "dark",
              "soft", "sweet", "fresh", "little", "young", "pretty", "strong", "simple", "wet", "dry", "funny",
              "lovely", "broken", "famous", "friendly", "careful")
VERBS = (("find", "found"), ("buy", "bought"), ("open", "opened"), ("close", "closed"), ("carry", "carried"),
         ("paint", "painted"), ("wash", "washed"), ("move", "moved"), ("sell", "sold"), ("fix", "fixed"),
         ("watch", "watched"), ("take", "took"), ("bring", "brought"), ("check", "checked"), ("share", "shared"),
         ("pack", "packed"), ("borrow", "borrowed"), ("lose", "lost"), ("drop", "dropped"), ("hide", "hid"),
         ("keep", "kept"), ("send", "sent"), ("show", "showed"), ("give", "gave"), ("return", "returned"),
         ("order", "ordered"), ("count", "counted"), ("bake", "baked"), ("cut", "cut"), ("fill", "filled"))
ACTIVITIES = ("waiting", "sleeping", "reading", "cooking", "singing", "working", "walking", "playing", "sitting",
              "smiling", "dancing", "swimming", "running", "laughing", "eating", "writing", "talking", "resting")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PARTS_OF_DAY = ("morning", "afternoon", "evening", "night")
WHEN = ("today", "yesterday", "tomorrow", "again", "together", "last week", "next week", "this morning",
        "after lunch", "before dinner", "every day", "on the weekend", "last night", "next summer")
WEATHER = ("sunny", "cloudy", "windy", "rainy", "foggy", "snowy", "warm", "cold")
MEALS = ("breakfast", "lunch", "dinner", "the party", "the picnic", "the trip")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
PREPOSITIONS = ("in", "near", "behind", "at", "next to", "across from", "outside")
# the words the sentence shapes themselves use
FRAME_WORDS = ("a", "all", "an", "and", "are", "because", "born", "but", "can", "costs", "did", "does", "dollars",
               "don't", "floor", "for", "forget", "how", "hundred", "if", "is", "it", "leave", "leaves", "left",
               "let's", "like", "many", "my", "need", "o'clock", "of", "opens", "or", "please", "put", "room", "some",
               "still", "the", "there", "this", "time", "to", "was", "we", "went", "were", "what", "where", "while",
               "why", "will", "with", "would", "years", "old", "on", "at", "in", "every", "you", "your", "bought")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0 <= n < 1000 written out ("forty five", "two hundred and six")."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words takes 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _clock(rng: random.Random) -> str:
    hour = number_words(rng.randint(1, 12))
    return rng.choice((f"{hour} o'clock", f"{hour} thirty", f"{hour} fifteen", f"{hour} forty five"))


def _sentence(rng: random.Random) -> str:
    """One sentence of a randomly chosen shape (uncapitalised, with its final punctuation)."""
    c = rng.choice
    name, person, animal, obj, food = c(NAMES), c(PEOPLE), c(ANIMALS), c(OBJECTS), c(FOODS)
    obj2, place, adj, adj2, verb = c(OBJECTS), c(PLACES), c(ADJECTIVES), c(ADJECTIVES), c(VERBS)
    n = rng.choice((rng.randint(2, 20), rng.randint(2, 99), rng.randint(100, 999)))
    shapes = (
        # statements
        lambda: f"the {adj} {animal[0]} is {c(ACTIVITIES)} {c(PREPOSITIONS)} the {place}.",
        lambda: f"{name} {verb[1]} {_a(adj + ' ' + obj[0])} {c(WHEN)}.",
        lambda: f"my {person[0]} {verb[1]} the {obj[0]} {c(PREPOSITIONS)} the {place}.",
        lambda: f"it was {c(WEATHER)} at the {place} {c(WHEN)}.",
        lambda: f"the {person[1]} were {c(ACTIVITIES)} near the {place} all {c(PARTS_OF_DAY)}.",
        lambda: f"{name} and {c(NAMES)} {verb[1]} {number_words(rng.randint(2, 12))} {obj[1]} {c(WHEN)}.",
        # two clauses
        lambda: f"{name} {verb[1]} the {obj[0]}, but the {obj2[0]} was still {adj2}.",
        lambda: f"we went to the {place} because the {obj[0]} was {adj}.",
        lambda: f"if it is {c(WEATHER)} on {c(DAYS)}, we will {verb[0]} the {obj[1]} {c(PREPOSITIONS)} the {place}.",
        lambda: f"the {animal[0]} {verb[1]} {_a(obj[0])} while the {person[0]} was {c(ACTIVITIES)}.",
        # questions
        lambda: f"where did you put the {adj} {obj[0]}?",
        lambda: f"can you {verb[0]} the {obj[1]} {c(WHEN)}?",
        lambda: f"did {name} {verb[0]} the {obj[0]} at the {place}?",
        lambda: f"why is the {person[0]} {c(ACTIVITIES)} {c(PREPOSITIONS)} the {place}?",
        lambda: f"how many {food[1]} are left in the {place}?",
        lambda: f"what time does the {c(VEHICLES)} leave on {c(DAYS)}?",
        lambda: f"is this your {obj[0]} or my {obj[0]}?",
        lambda: f"would you like some {c(MASS_FOODS)} with your {food[0]}?",
        # requests
        lambda: f"please {verb[0]} the {adj} {obj[0]} before {c(PARTS_OF_DAY) if rng.random() < 0.5 else c(DAYS)}.",
        lambda: f"don't forget to {verb[0]} the {obj[1]} for {c(MEALS)}.",
        lambda: f"let's {verb[0]} the {obj[0]} to the {place} {c(WHEN)}.",
        # lists
        lambda: f"we need {c(MASS_FOODS)}, {food[1]} and {c(FOODS)[1]} for {c(MEALS)}.",
        lambda: f"{name} bought {number_words(rng.randint(2, 12))} {food[1]}, {_a(obj[0])} and some "
                f"{c(MASS_FOODS)}.",
        lambda: f"the {obj[0]}, the {obj2[0]} and the {c(OBJECTS)[0]} are in the {place}.",
        # numbers, dates and times
        lambda: f"the {c(VEHICLES)} leaves at {_clock(rng)} on {c(DAYS)}.",
        lambda: f"there are {number_words(n)} {c((animal, obj, food))[1]} in the {place}.",
        lambda: f"my {person[0]} is {number_words(rng.randint(5, 90))} years old.",
        lambda: f"room {number_words(rng.randint(1, 99))} is on the {c(ORDINALS)} floor.",
        lambda: f"the {obj[0]} costs {number_words(rng.randint(2, 99))} dollars.",
        lambda: f"{name} was born on the {c(ORDINALS)} of {c(MONTHS)}.",
        lambda: f"the {place} opens at {_clock(rng)} every {c(DAYS)}.",
    )
    return rng.choice(shapes)()


def generate_sentences(count: int, rng: random.Random, exclude=()) -> list[str]:
    """`count` distinct sentences (capitalised), none equal (case and punctuation aside) to one in `exclude`."""
    seen = {_sentence_key(s) for s in exclude}
    out: list[str] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 100 * count + 1000:
            raise CorpusError(f"the sentence generator ran out of distinct sentences after {len(out)}")
        s = _sentence(rng)
        s = s[0].upper() + s[1:]
        key = _sentence_key(s)
        if key in seen:
            continue
        seen.add(key)
        out.append(s)
    return out


def _sentence_key(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def vocabulary() -> set[str]:
    """Every word the sentence generator can use."""
    words: set[str] = set()
    pools = (NAMES, [w for p in PEOPLE + ANIMALS + OBJECTS + FOODS + VERBS for w in p], MASS_FOODS, VEHICLES, PLACES,
             ADJECTIVES, ACTIVITIES, DAYS, MONTHS, PARTS_OF_DAY, WHEN, WEATHER, MEALS, ORDINALS, PREPOSITIONS,
             _ONES[1:], _TENS, FRAME_WORDS)
    for pool in pools:
        for item in pool:
            words.update(re.findall(r"[a-z']+", item.lower()))
    return words


# ============================================================================================ plan

def _balanced(classes, n: int, rng: random.Random) -> list:
    """n class values, each class n/k times (the remainder spread over random classes), in random order."""
    values = [classes[i % len(classes)] for i in range(n)]
    offset = rng.randrange(len(classes))
    values = [classes[(classes.index(v) + offset) % len(classes)] for v in values]
    rng.shuffle(values)
    return values


def plan_corpus(quick: bool = False, seed: int = 0) -> list[dict]:
    """Every clip to synthesise: split, id, text, voice, target labels and espeak/noise settings. Deterministic in
    (quick, seed)."""
    rng = random.Random(f"eureka-recipe-corpus-{seed}")
    sizes = SIZES["quick" if quick else "full"]
    held_sentences = generate_sentences(sizes["heldout"], rng)
    train_sentences = generate_sentences(sizes["train"], rng, exclude=held_sentences)
    plans = []
    for split, sentences in (("train", train_sentences), ("heldout", held_sentences)):
        n = sizes[split]
        targets = {attr: _balanced(values, n, rng) for attr, values in LABELS.items()}
        variants = {g: [v for v in vs if (v in HELD_OUT_VARIANTS) == (split == "heldout")]
                    for g, vs in VARIANTS.items()}
        turn = {g: rng.randrange(len(v)) for g, v in variants.items()}
        for i in range(n):
            gender = targets["gender"][i]
            variant = variants[gender][turn[gender] % len(variants[gender])]
            turn[gender] += 1
            accent = ACCENTS[rng.randrange(len(ACCENTS))]
            pitch_t, rate_t, noise_t = targets["pitch_level"][i], targets["speaking_rate"][i], targets["noise"][i]
            snr = rng.choice(SNR_CHOICES[noise_t])
            clip_id = f"{split}-{i:05d}-{accent}-{variant}"
            plans.append({
                "id": clip_id, "split": split, "text": sentences[i], "accent": accent, "variant": variant,
                "gender": gender, "target": {"pitch_level": pitch_t, "speaking_rate": rate_t, "noise": noise_t},
                "espeak_pitch": rng.randint(*PITCH_RANGES[gender][pitch_t]),
                "espeak_speed_wpm": rng.randint(*SPEED_RANGES[rate_t]), "word_gap": WORD_GAPS[rate_t],
                "snr_db": snr, "noise_kind": None if snr is None else rng.choice(("white", "pink")),
                "noise_seed": rng.randrange(2 ** 31)})
    return plans


# ============================================================================================ synthesis

def _pitch_ok(f0: float, gender: str, target: str) -> bool:
    from ..dataflux.synthetic import pitch_class
    from ..dataflux.acoustics import FEMALE_PITCH_BANDS, MALE_PITCH_BANDS

    low, high = MALE_PITCH_BANDS if gender == "male" else FEMALE_PITCH_BANDS
    if not math.isfinite(f0) or pitch_class(f0, gender) != target:
        return False
    m = PITCH_MARGIN
    return {"low": f0 < low * (1 - m), "high": f0 > high * (1 + m),
            "medium": low * (1 + m) <= f0 <= high * (1 - m)}[target]


def _rate_ok(sps: float, target: str) -> bool:
    from ..dataflux.acoustics import FAST_SYL_PER_S, SLOW_SYL_PER_S

    return {"slow": sps < SLOW_SYL_PER_S - RATE_MARGIN, "fast": sps > FAST_SYL_PER_S + RATE_MARGIN,
            "normal": SLOW_SYL_PER_S + RATE_MARGIN <= sps <= FAST_SYL_PER_S - RATE_MARGIN}[target]


def _adjust(setting: dict, gender: str, target: dict, f0: float, sps: float, pitch_ok: bool, rate_ok: bool):
    """Move the espeak settings towards the target classes after a miss."""
    from ..dataflux.acoustics import FAST_SYL_PER_S, FEMALE_PITCH_BANDS, MALE_PITCH_BANDS, SLOW_SYL_PER_S

    if not pitch_ok:
        low, high = MALE_PITCH_BANDS if gender == "male" else FEMALE_PITCH_BANDS
        want = {"low": low * 0.85, "medium": (low + high) / 2, "high": high * 1.15}[target["pitch_level"]]
        step = 12 if not math.isfinite(f0) or abs(f0 - want) > 0.15 * want else 6
        direction = 1 if not math.isfinite(f0) or f0 < want else -1
        lo, hi = PITCH_LIMITS[gender]
        setting["espeak_pitch"] = int(min(hi, max(lo, setting["espeak_pitch"] + direction * step)))
    if not rate_ok:
        want = {"slow": SLOW_SYL_PER_S * 0.8, "normal": (SLOW_SYL_PER_S + FAST_SYL_PER_S) / 2,
                "fast": FAST_SYL_PER_S * 1.15}[target["speaking_rate"]]
        if sps > want and target["speaking_rate"] == "slow" and setting["espeak_speed_wpm"] <= 80:
            setting["word_gap"] += 3  # espeak's slowest speed: only longer gaps slow it further
        else:
            factor = max(0.6, min(1.6, want / max(sps, 0.1)))
            setting["espeak_speed_wpm"] = int(min(450, max(80, round(setting["espeak_speed_wpm"] * factor))))


def synthesize_clip(plan: dict, out_dir: str) -> dict:
    """Speak one planned clip, measure its labels on the clean signal, mix in its noise, write its wav; returns
    its corpus row."""
    from ..dataflux.acoustics import CLEAN_SNR_DB, count_syllables, rate_class
    from ..dataflux.synthetic import mix_at_snr, pitch_class, reference_f0, speech_span, synthesize

    gender, target = plan["gender"], plan["target"]
    setting = {k: plan[k] for k in ("espeak_pitch", "espeak_speed_wpm", "word_gap")}
    syllables = sum(count_syllables(w) for w in re.findall(r"[A-Za-z']+", plan["text"]))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        speech = synthesize(plan["text"], plan["variant"], setting["espeak_pitch"], setting["espeak_speed_wpm"],
                            language=plan["accent"], word_gap=setting["word_gap"])
        clean = np.concatenate([np.zeros(int(LEAD_SILENCE_S * SAMPLE_RATE), np.float32), speech,
                                np.zeros(int(TRAIL_SILENCE_S * SAMPLE_RATE), np.float32)])
        clean *= 0.5 / max(1e-9, float(np.max(np.abs(clean))))
        span = speech_span(clean)
        span_s = (span[1] - span[0]) / SAMPLE_RATE
        try:
            f0 = reference_f0(clean[span[0]: span[1]], gender)
        except Exception:  # too little voicing for Praat: counts as a miss
            f0 = float("nan")
        sps = syllables / span_s if span_s > 0 else 0.0
        pitch_ok, rate_ok = _pitch_ok(f0, gender, target["pitch_level"]), _rate_ok(sps, target["speaking_rate"])
        if (pitch_ok and rate_ok) or attempt == MAX_ATTEMPTS:
            break
        _adjust(setting, gender, target, f0, sps, pitch_ok, rate_ok)
    snr = plan["snr_db"]
    audio = clean if snr is None else mix_at_snr(clean, span, snr, plan["noise_kind"], seed=plan["noise_seed"])
    rel = f"audio/{plan['split']}/{plan['id']}.wav"
    _write_wav(os.path.join(out_dir, rel), audio)
    labels = {"gender": gender, "pitch_level": pitch_class(f0, gender) if math.isfinite(f0) else None,
              "speaking_rate": rate_class(sps), "noise": "clean" if snr is None or snr >= CLEAN_SNR_DB else "noisy"}
    return {
        "id": plan["id"], "audio": rel, "split": plan["split"], "text": plan["text"],
        "voice": f"{plan['accent']}+{plan['variant']}", "variant": plan["variant"], "accent": plan["accent"],
        **labels, "snr_db": snr, "noise_kind": plan["noise_kind"],
        "espeak_pitch": setting["espeak_pitch"], "espeak_speed_wpm": setting["espeak_speed_wpm"],
        "espeak_word_gap": setting["word_gap"], "duration_s": round(audio.size / SAMPLE_RATE, 3),
        "f0_median_hz": round(f0, 1) if math.isfinite(f0) else None, "syllables_per_second": round(sps, 2),
        "speech_span_s": round(span_s, 3), "target": target, "on_target": pitch_ok and rate_ok,
        "attempts": attempt,
    }


def _write_wav(path: str, audio: np.ndarray) -> None:
    import soundfile as sf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.wav"
    sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, path)


def _synthesize_job(args):
    plan, out_dir = args
    return synthesize_clip(plan, out_dir)


# ============================================================================================ build

def _reporter(progress):
    """progress: None -> lines on stderr, False -> silent, a callable -> called with each line."""
    if progress is False:
        return lambda msg: None
    if callable(progress):
        return progress
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def summarize(rows: list[dict]) -> dict:
    """Clip counts, label counts per split, held-out variants and sentence counts, audio seconds."""
    out = {"clips": {}, "labels": {}, "audio_seconds": {}, "sentences": {}, "variants": {}}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        out["clips"][split] = len(part)
        out["labels"][split] = {attr: dict(sorted(Counter(str(r.get(attr)) for r in part).items()))
                                for attr in LABELS}
        out["audio_seconds"][split] = round(sum(r["duration_s"] for r in part), 1)
        out["sentences"][split] = len({_sentence_key(r["text"]) for r in part})
        out["variants"][split] = sorted({r["variant"] for r in part})
    out["held_out_variants"] = out["variants"]["heldout"]
    out["off_target"] = sum(not r.get("on_target", True) for r in rows)
    return out


def build_corpus(out_dir: str, *, quick: bool = False, seed: int = 0, workers: int = 2, progress=None) -> dict:
    """Synthesise the corpus into out_dir (see the module docstring) and return its summary: counts per split and
    label, held-out variants and sentence counts, seconds taken. A finished corpus (corpus.jsonl present) built with
    the same settings is reused, not rebuilt; one built with other settings is an error."""
    from ..dataflux.synthetic import espeak_available
    from ..fsutil import atomic_write

    say = _reporter(progress)
    settings = {"version": CORPUS_VERSION, "quick": bool(quick), "seed": int(seed)}
    corpus_path = os.path.join(out_dir, CORPUS_FILE)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    if os.path.exists(corpus_path):
        summary = _read_summary(summary_path)
        if summary.get("settings") != settings:
            raise CorpusError(f"{out_dir} holds a corpus built with {summary.get('settings')}, not {settings}; "
                              "choose another directory or remove it")
        summary["reused"] = True
        say(f"corpus: reusing {summary['clips']['train']} train + {summary['clips']['heldout']} held-out clips "
            f"in {out_dir}")
        return summary
    if not espeak_available():
        raise CorpusError("the corpus needs espeak-ng: install the espeak-ng program or `pip install espeakng-loader`")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    plans = plan_corpus(quick=quick, seed=seed)
    say(f"corpus: synthesising {len(plans)} clips with {workers} worker(s) into {out_dir}")
    planned = {f"{p['id']}.wav" for p in plans}
    for split in SPLITS:
        folder = os.path.join(out_dir, "audio", split)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # leftovers of an unfinished build with other settings
            if _CLIP_FILE.match(name) and name not in planned:
                os.remove(os.path.join(folder, name))
    rows: list[dict] = []
    jobs = [(p, out_dir) for p in plans]
    step = max(1, len(plans) // 20)
    last = time.perf_counter()

    def report(done):
        nonlocal last
        now = time.perf_counter()
        if done == len(plans) or done % step == 0 and now - last > 1.0:
            last = now
            rate = done / max(now - t0, 1e-9)
            say(f"corpus: {done}/{len(plans)} clips, {now - t0:.0f} s, {rate:.1f} clips/s")

    if workers == 1:
        for job in jobs:
            rows.append(_synthesize_job(job))
            report(len(rows))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the caller may hold torch threads, which a forked child must not inherit
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(_synthesize_job, jobs, chunksize=4):
                rows.append(row)
                report(len(rows))
    seconds = time.perf_counter() - t0
    summary = {"settings": settings, **summarize(rows), "seconds": round(seconds, 1), "workers": workers,
               "reused": False}
    atomic_write(summary_path, json.dumps(summary, indent=1).encode())
    atomic_write(corpus_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    say(f"corpus: {len(rows)} clips ({summary['clips']['train']} train, {summary['clips']['heldout']} held-out; "
        f"{summary['audio_seconds']['train'] + summary['audio_seconds']['heldout']:.0f} s of audio) in {seconds:.1f} s"
        f"; {summary['off_target']} clip(s) off their target class")
    return summary


def _read_summary(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read the corpus summary ({exc})") from exc


def read_corpus(corpus_dir: str) -> list[dict]:
    """The rows of corpus_dir/corpus.jsonl, each with "audio" resolved to an absolute path under "audio_path"."""
    path = os.path.join(corpus_dir, CORPUS_FILE)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n}: not JSON ({exc.msg})") from None
            missing = [k for k in ("id", "audio", "split", "text") if k not in row]
            if missing:
                raise CorpusError(f"{path}:{n}: row lacks {missing}")
            if row["split"] not in SPLITS:
                raise CorpusError(f"{path}:{n}: split must be one of {SPLITS}, got {row['split']!r}")
            audio = row["audio"]
            row["audio_path"] = os.path.normpath(audio if os.path.isabs(audio) else os.path.join(corpus_dir, audio))
            rows.append(row)
    return rows


def _main(argv=None) -> int:
    """python -m eureka_fast.recipe.corpus OUT [--quick] [--seed N] [--workers N]: build the corpus alone."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eureka_fast.recipe.corpus", description=_main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--quick", action="store_true", help="toy size (24 train, 12 held-out clips)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="synthesis processes")
    args = p.parse_args(argv)
    try:
        summary = build_corpus(args.out_dir, quick=args.quick, seed=args.seed, workers=args.workers)
    except (CorpusError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
