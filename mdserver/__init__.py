"""mdserver: an EC2-compatible metadata service for standalone libvirt/KVM hosts."""

__version__ = "0.7.0"
