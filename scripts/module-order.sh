# Sourced by the guest-asset scripts (guest-assets.sh, riscv-assets.sh).
#
# module_order MODDIR NAME...: sets the array `order` to the .ko files under MODDIR that
# the modules NAME... need, in load order. Each .ko names what it needs in its modinfo
# `depends=` field (Debian's kernel packages ship no modules.dep): the order is a
# depth-first walk of that graph. A name with no .ko is built into the kernel.
module_order() {
    local moddir="$1"
    shift
    declare -gA _mo_path=() _mo_done=()
    order=()
    local ko name
    while IFS= read -r ko; do
        name="$(basename "$ko" .ko)"
        _mo_path[$name]="$ko"
        _mo_path[${name//-/_}]="$ko"
    done < <(find "$moddir" -name '*.ko')
    local m
    for m in "$@"; do _module_order_visit "$m"; done
}

_module_order_visit() {
    local m="${1//-/_}"
    [ -n "${_mo_done[$m]:-}" ] && return 0
    _mo_done[$m]=1
    local ko="${_mo_path[$m]:-}"
    [ -n "$ko" ] || return 0
    local deps d
    deps="$(strings -n 3 "$ko" | sed -n 's/^depends=//p' | head -n1)"
    for d in ${deps//,/ }; do _module_order_visit "$d"; done
    order+=("$ko")
}
