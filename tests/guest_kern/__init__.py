"""Scripts run inside the test guest (tests/guest.py) against the guest's real kernel:
vhost-net, vhost-vsock and vhost-vdpa (VDUSE) through ``vhost.kern`` and ``vhost.vdpa``."""
