"""The stitcher: assembles a story's final video from its stored, committed shots.

The work is `storymem.story.stitch_story` (the same code the one-process runner uses); the actor
only gives it a place to run beside the directors and its own storage client.
"""

from __future__ import annotations

import ray

from storymem.config import StorageConfig
from storymem.storage import S3Store, StoryLayout
from storymem.story import Manifest, stitch_story


@ray.remote(max_restarts=-1, max_task_retries=3)
class Stitcher:
    def __init__(self, storage_cfg: StorageConfig):
        self.store = S3Store(storage_cfg)
        self.stitched = 0

    def stitch(self, story_id: str, manifest_json: str) -> dict:
        """Stitch the shots the manifest names; returns {final: key, final_frames: n, stitch: how}."""
        manifest = Manifest.model_validate_json(manifest_json)
        if manifest.story_id != story_id:
            raise ValueError(f"manifest: belongs to story {manifest.story_id}, not {story_id}")
        key, frames, how = stitch_story(self.store, StoryLayout(story_id), manifest)
        self.stitched += 1
        return {"final": key, "final_frames": frames, "stitch": how}
