"""virtio devices for both transports: pyhv's VMM (virtio-pci, later) and vhost-user
backends for QEMU, Cloud Hypervisor or crosvm (`vhost_user`). A device (`blk`) knows its
requests, not its transport; a transport hands it queues (`hvcore.virtio.queue`) with a
kick and a call eventfd, which `queues.QueueWorker` serves."""
