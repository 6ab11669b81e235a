/* A boot sector that exercises its boot disk through the BIOS (SeaBIOS drives virtio-blk):
 * read 64 sectors from LBA 1, invert every byte, write them to LBA 1000, then report on the
 * debugcon port (0xe9) and leave through isa-debug-exit (port 0xf4): "OK" and exit status 33,
 * or "E" plus the BIOS error code and status 35.
 * Build: as --32 -o boot.o boot.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o boot.bin boot.o
 */
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    movw $64, dap_count
    movw $0x1000, dap_seg
    movl $1, dap_lba
    mov $dap, %si
    mov $0x42, %ah
    mov drive, %dl
    int $0x13
    jc fail
    mov $0x1000, %ax
    mov %ax, %es
    xor %di, %di
    mov $0x8000, %cx
invert:
    notb %es:(%di)
    inc %di
    loop invert
    movl $1000, dap_lba
    mov $dap, %si
    mov $0x4300, %ax
    mov drive, %dl
    int $0x13
    jc fail
    mov $'O', %al
    out %al, $0xe9
    mov $'K', %al
    out %al, $0xe9
    mov $0x10, %al
    out %al, $0xf4
    hlt
fail:
    mov %ah, %bl
    mov $'E', %al
    out %al, $0xe9
    mov %bl, %al
    out %al, $0xe9
    mov $0x11, %al
    out %al, $0xf4
    hlt
drive:
    .byte 0
    .align 4
dap:
    .byte 0x10, 0
dap_count:
    .word 0
dap_off:
    .word 0
dap_seg:
    .word 0
dap_lba:
    .long 0, 0
    . = _start + 510
    .byte 0x55, 0xaa
