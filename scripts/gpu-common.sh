# Shared by scripts/gpu-*.sh (source it): the Vulkan loader for the lent GPU machines, as
# ../shared/GPU.md says. The device has the NVIDIA driver but not the loader.

# Here: download the loader's packages into .gl/ (git-ignored) once.
loader_prepare() {
    grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >> .git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    mkdir -p .gl .gpu /tmp/amd64/partial
    if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
        o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
        apt-get $o update
        (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    fi
}

# On the device: unpack the loader and point it at the NVIDIA driver.
loader_unpack() {
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
}
