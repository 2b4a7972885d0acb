"""Put MedicoSAM, or any SAM checkpoint, into the annotation tools people already use."""

__version__ = "0.1.0"
