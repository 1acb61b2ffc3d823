"""Feature extraction for the ``cached`` data mode (issue #27): every item's VAE latent and caption features into a
sharded feature store (``feature_store``), a batch at a time, each data-parallel rank its own slice and part.

Bad data never stops the run: an entry without an image path or caption, an unreadable image or one smaller than
the smallest bucket is recorded as skipped, by reason, in the store. A run that is killed resumes where its part's
last complete shard ended (rerun the same command).
"""

import os

import numpy as np

import mindspore as ms

from ..text import gemma
from .data import TOO_SMALL, UNREADABLE, encode_latents, folder_digest, load_image
from .feature_store import ShardWriter, write_shared
from .sources import items_digest

NO_IMAGE, NO_CAPTION = "no image path", "missing caption"  # skip reasons besides data.UNREADABLE, data.TOO_SMALL
REASONS = (NO_IMAGE, NO_CAPTION, UNREADABLE, TOO_SMALL)


def entry_problem(item) -> str | None:
    """Why a list entry cannot be used before its image is opened (``NO_IMAGE``, ``NO_CAPTION``), or None."""
    return NO_IMAGE if item.image is None else NO_CAPTION if item.caption is None else None


def store_meta(items: list, text_encoder: str, vae: str | None, bucket_list: list, max_tokens: int) -> dict:
    """What the features are made with; a store (or a resumed part) with other values is refused."""
    return {
        "text_encoder": folder_digest(text_encoder),
        "vae": None if vae is None else folder_digest(vae),
        "buckets": [list(b) for b in bucket_list],
        "max_caption_tokens": max_tokens,
        "items": len(items),
        "item_digest": items_digest(items),
    }


def extract(items, folder: str, meta: dict, tokenizer, encoder, vae, bucket_list: list, max_tokens: int, rank: int = 0,
            world: int = 1, batch: int = 16, shard_bytes: int = 256 << 20, log=print) -> dict:  # fmt: skip
    """Store the features of ``items[rank::world]`` as part ``r{rank}`` of the store in ``folder``; rank 0 also
    stores the empty caption's features (shared ``empty_caption``). Returns this part's skipped counts by reason."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    with ShardWriter(folder, f"r{rank}", meta, shard_bytes) as writer:
        if rank == 0:
            feats, lengths = _caption_features(tokenizer, encoder, [""], max_tokens)
            write_shared(folder, "empty_caption", {"cap_feats": feats[0, : lengths[0]]})
        mine = items[rank::world]
        done = sum(item.id in writer.done for item in mine)
        if done:
            log(f"rank {rank}: resuming, {done} of {len(mine)} items done before")
        # fixed batches of this rank's items, each committed whole: a resumed run encodes exactly the batches (and
        # so the padded shapes) an uninterrupted one does; items another part holds (a store extracted with another
        # number of ranks) are not stored twice
        for start in range(0, len(mine), batch):
            chunk = [item for item in mine[start : start + batch] if item.id not in writer.done]
            if not chunk:
                continue
            good, images = [], []
            for item in chunk:
                reason = entry_problem(item)
                image = None if reason else load_image(item.image, bucket_list)
                if reason or isinstance(image, str):
                    writer.skip(item.id, reason or image)
                    continue
                good.append(item)
                images.append(image)
            if good:
                latents = encode_latents(images, vae)
                feats, lengths = _caption_features(tokenizer, encoder, [item.caption for item in good], max_tokens)
                for item, z, f, n in zip(good, latents, feats, lengths):
                    writer.add(item.id, {"latent": z, "cap_feats": f[:n]})
            writer.commit()
            log(f"rank {rank}: {min(start + batch, len(mine))} / {len(mine)} items")
    skipped = {reason: len(ids) for reason, ids in writer.index["skipped"].items()}
    log(f"rank {rank}: stored {len(writer.stored)} samples in {folder}, skipped {skipped or 'none'}")
    return skipped


def pending(folder: str, meta: dict, items: list, rank: int = 0, world: int = 1) -> int:
    """How many of ``items[rank::world]`` the store in ``folder`` has neither stored nor skipped (all when it does
    not exist); a store made with other settings is refused."""
    if not os.path.isdir(folder):
        return len(items[rank::world])
    done = ShardWriter.done_ids(folder, meta)
    return sum(item.id not in done for item in items[rank::world])


def _caption_features(tokenizer, encoder, captions: list, max_tokens: int):
    """(features (B, Lc, D) float32, real token counts (B,)): each row's first ``count`` rows are its tokens. Padded
    to ``max_tokens`` (one encoder graph; a length per batch would compile once per length)."""
    feats, mask = gemma.encode_prompts(tokenizer, encoder, captions, None, max_tokens, pad_to_max=True)
    mask = mask.asnumpy()
    assert np.all(np.cumsum(1 - mask, axis=1)[mask == 1] == 0), "right padding expected"
    return feats.astype(ms.float32).asnumpy(), mask.sum(axis=1)
