-- Orthanc: forward every stable image series (MR/CT) to medseg over DICOMweb STOW-RS.
-- SEG series (medseg's own results, pushed back into the study) are not forwarded, so a result
-- never triggers another job.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags["Modality"]
  if modality == "MR" or modality == "CT" then
    RestApiPost('/dicom-web/servers/medseg/stow', '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}')
  end
end
