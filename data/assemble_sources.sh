#!/usr/bin/env bash
# Re-create data/sources/ from the packages named in ../shared/DESIGN.md ("Offline data we may
# bundle"). Needs pip and apt-get (package registries only). Versions used for the bundled copy:
# antspyx 0.6.3 (sdist), nilearn 0.14.1, dipy 1.12.1, nibabel 5.4.2, insighttoolkit5-examples 5.2.1-5+deb12u1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python3 -m pip download -q --no-deps --no-binary=:all: -d ants antspyx==0.6.3
python3 -m pip download -q --no-deps -d nilearn nilearn==0.14.1
python3 -m pip download -q --no-deps --only-binary=:all: -d dipy dipy==1.12.1
python3 -m pip download -q --no-deps -d nibabel nibabel==5.4.2
apt-get download insighttoolkit5-examples
mkdir -p x && tar xzf ants/antspyx-*.tar.gz -C x
(cd x && unzip -q -o ../nilearn/*.whl 'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz' \
      'nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz' \
      'nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz' \
      && unzip -q -o ../dipy/*.whl 'dipy/data/files/S0_10slices.nii.gz' \
      && unzip -q -o ../nibabel/*.whl 'nibabel/tests/data/anatomical.nii' \
      && dpkg -x ../insighttoolkit5-examples_*.deb itk)
out="$here/sources"
mkdir -p "$out"
cp x/antspyx-*/data/r{16,27,30,62,64,85}slice.jpg "$out/"
itk=x/itk/usr/share/doc/insighttoolkit5-examples/examples/Data
cp "$itk"/{KmeansTest_T1UCharRaw.nii.gz,BrainMidSagittalSlice.png,BrainT1Slice.png,BrainProtonDensitySlice.png} "$out/"
cp x/nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz "$out/"
cp x/dipy/data/files/S0_10slices.nii.gz x/nibabel/tests/data/anatomical.nii "$out/"
echo "sources written to $out"
