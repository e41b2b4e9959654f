"""A tag that CI pushes again the moment pr-preview has read it: between the image check and
the instance's pull, as a second build of the same sha (or someone with push rights) can."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from local_stack.registry import FakeRegistry, image_config
from local_stack.serve import serve_handler


@dataclass
class MovingTags:
    """``host`` serves ``registry``; a tag given to :meth:`move` is repointed to a new manifest
    right after the first request that reads it. ``moved`` holds (read, repointed) digests."""

    registry: FakeRegistry
    name: str
    host: str = ""
    moving: set[str] = field(default_factory=set)
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)

    def move(self, tag: str) -> None:
        self.moving.add(tag)

    def handle(self, request: httpx.Request) -> httpx.Response:
        response = self.registry.handle(request)
        tag = request.url.path.rpartition(f"/v2/{self.name}/manifests/")[2]
        if response.status_code == 200 and tag in self.moving:
            self.moving.discard(tag)
            read = self.registry.repositories[self.name].tags[tag]
            private = self.registry.repositories[self.name].private
            pushed = self.registry.push(
                self.name, tag, private=private, config=image_config(["sh", "-c", "repointed"])
            )
            self.moved[tag] = (read, pushed)
        return response


@contextmanager
def moving_tags(registry: FakeRegistry, name: str) -> Iterator[MovingTags]:
    """Serve ``registry`` on a port of its own whose tags can move (its host is 127.0.0.1, so
    token requests still go to ``registry``'s own port, as a realm elsewhere would)."""
    tags = MovingTags(registry, name)
    with serve_handler(tags.handle) as url:
        tags.host = url.removeprefix("http://")
        yield tags
