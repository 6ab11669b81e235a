"""PCI configuration-space offsets and bits (from the PCI Local Bus specification)."""
from __future__ import annotations

CONFIG_SPACE_SIZE = 0x100
EXTENDED_CONFIG_SPACE_SIZE = 0x1000
CONFIG_HEADER_SIZE = 0x40

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BASE_ADDRESS_0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

NUM_REGIONS = 6

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_SERR = 0x100
COMMAND_INTX_DISABLE = 0x400

STATUS_INTERRUPT = 0x08
STATUS_CAP_LIST = 0x10
STATUS_PARITY = 0x100
STATUS_SIG_TARGET_ABORT = 0x800
STATUS_REC_TARGET_ABORT = 0x1000
STATUS_REC_MASTER_ABORT = 0x2000
STATUS_SIG_SYSTEM_ERROR = 0x4000
STATUS_DETECTED_PARITY = 0x8000

HEADER_TYPE_NORMAL = 0x00
HEADER_TYPE_MULTI_FUNCTION = 0x80

BASE_ADDRESS_SPACE_IO = 0x01
BASE_ADDRESS_SPACE_MEMORY = 0x00
BASE_ADDRESS_MEM_TYPE_64 = 0x04
BASE_ADDRESS_MEM_PREFETCH = 0x08
BASE_ADDRESS_MEM_MASK = ~0x0F
BASE_ADDRESS_IO_MASK = ~0x03

#: Address reported for a BAR that is not decoded (QEMU's PCI_BAR_UNMAPPED).
BAR_UNMAPPED = (1 << 64) - 1

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VNDR = 0x09
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

MSI_FLAGS = 2
MSI_FLAGS_ENABLE = 0x0001
MSI_FLAGS_QMASK = 0x000E
MSI_FLAGS_QSIZE = 0x0070
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_MASKBIT = 0x0100
MSI_ADDRESS_LO = 4

MSIX_FLAGS = 2                     # message control (word)
MSIX_FLAGS_QSIZE = 0x07FF          # table size - 1 (read-only)
MSIX_FLAGS_MASKALL = 0x4000        # function mask
MSIX_FLAGS_ENABLE = 0x8000
MSIX_TABLE = 4                     # table offset | BIR (dword)
MSIX_PBA = 8                       # pending bit array offset | BIR (dword)
MSIX_BIR_MASK = 0x7
MSIX_CAP_LENGTH = 12
MSIX_ENTRY_SIZE = 16               # table entry: address lo, address hi, data, vector control
MSIX_ENTRY_LOWER_ADDR = 0x0
MSIX_ENTRY_UPPER_ADDR = 0x4
MSIX_ENTRY_DATA = 0x8
MSIX_ENTRY_VECTOR_CTRL = 0xC
MSIX_ENTRY_CTRL_MASKBIT = 0x1
MSIX_MAX_ENTRIES = MSIX_FLAGS_QSIZE + 1

#: Red Hat/Qumranet subsystem IDs QEMU gives devices that set none.
SUBVENDOR_ID_REDHAT_QUMRANET = 0x1AF4
SUBDEVICE_ID_QEMU = 0x1100

VENDOR_ID_QEMU = 0x1234
VENDOR_ID_REDHAT = 0x1B36

#: QEMU's PCI_CLASS_OTHERS: used as a 16-bit class word, i.e. base class 0x00, sub-class 0xff.
CLASS_OTHERS = 0x00FF
CLASS_BRIDGE_HOST = 0x0600

#: Class descriptions shown by ``info pci`` (base class << 8 | sub-class).
CLASS_NAMES = {
    0x0001: "VGA controller", 0x0100: "SCSI controller", 0x0101: "IDE controller",
    0x0102: "Floppy controller", 0x0103: "IPI controller", 0x0104: "RAID controller",
    0x0106: "SATA controller", 0x0108: "NVMe controller", 0x0180: "Storage controller",
    0x0200: "Ethernet controller", 0x0280: "Network controller", 0x0300: "VGA controller",
    0x0302: "3D controller", 0x0380: "Display controller", 0x0400: "Video controller",
    0x0401: "Audio controller", 0x0403: "Audio controller", 0x0480: "Multimedia controller",
    0x0500: "RAM controller", 0x0580: "Memory controller", 0x0600: "Host bridge",
    0x0601: "ISA bridge", 0x0604: "PCI bridge", 0x0680: "Bridge", 0x0700: "Serial port",
    0x0780: "Communication controller", 0x0800: "PIC", 0x0880: "System peripheral",
    0x0c03: "USB controller", 0x0c05: "SMBus", 0x0d00: "IrDA controller",
    0x0e00: "I2O controller", 0x1000: "Network and computing encryption device",
    0x1180: "Data acquisition and signal processing controller",
}


def devfn(slot: int, func: int) -> int:
    return (slot << 3) | func


def slot_of(devfn_: int) -> int:
    return devfn_ >> 3


def func_of(devfn_: int) -> int:
    return devfn_ & 7
