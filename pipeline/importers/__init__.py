"""Importers for published pre-extracted features (IEMOCAP, CMU-MOSI, CMU-MOSEI).

- `gcnet`: GCNet / MoMKE layout (label pickle + per-utterance .npy folders)
- `mmsa`: MMSA `aligned_50.pkl` / `unaligned_50.pkl`
- `safe_pickle`: allow-list unpickler; downloaded pickles never run code
- `missingness`: absent / empty / all-zero features become missing with a reason
- `stage`: the `import` stage (params section `import`)
- `folds`: IEMOCAP leave-one-session-out loop and fold aggregation
"""
