"""One process of tests/test_image_cache.py's two-process run: joins the run on 127.0.0.1, loads the toy
category through datasets.load_category (which prepares the tfds data on process 0 and resizes the
images on every process), and writes which rows this process decoded to <out>.

  python -m tests.image_cache_worker <port> <process_id> <toy root> <cache dir> <out.json>
"""
import json
import sys

from adtr_jax import multihost
from adtr_jax.data import datasets, pipeline
from tests.tiny_config import make


def main(port: str, process_id: str, root: str, cache: str, out: str) -> None:
  multihost.initialize(f'127.0.0.1:{port}', 2, int(process_id), timeout_s=60)
  decoded = []
  load_resized = pipeline.load_resized

  def counted(source, index, image_size):
    decoded.append([source.split, int(index)])
    return load_resized(source, index, image_size)

  pipeline.load_resized = counted
  data = datasets.load_category(make(root, cache), 'toy')
  with open(out, 'w') as f:
    json.dump({'decoded': decoded, 'train': len(data.train), 'test': len(data.test)}, f)
  multihost.leave(ok=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
