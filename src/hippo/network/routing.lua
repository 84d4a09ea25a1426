-- HippoVolume auto-routing for Orthanc (1.10+): send stable studies' input series (HippoCrop, else a
-- whole-head T1) to the AI.
--
-- Loaded through "LuaScripts" in the orthanc.json that hippo.network.orthanc.write_config writes;
-- that function puts a header above this text that sets
--   HIPPO_ROUTE_TO     the DicomModalities name of the AI listener (default "hippoai")
--   HIPPO_ROUTE_SCOPE  "series" (default) or "study"
--
-- Rule (the network contract): when a study becomes stable (no new instance for StableAge s),
--   * skip it when it already holds a result series: SeriesDescription containing "research use",
--     or one of our SeriesNumbers 9001-9003 with Modality SEG, SR or OT (the report is a
--     Secondary Capture, modality OT);
--   * send its HippoCrop series: SeriesDescription containing "HippoCrop" (case-insensitive);
--   * when there is none, its whole-head T1 candidates: MR series whose SeriesDescription or
--     ProtocolName names a T1 sequence (t1, mprage, spgr, bravo, tfe, fl3d, mp2rage) and no
--     localizer, contrast or other weighting (the listener's series rules make the final choice:
--     conf/series/wholehead/t1.yaml);
--   * skip it when there is neither;
--   * otherwise C-STORE it to HIPPO_ROUTE_TO as one asynchronous Orthanc job
--     (POST /modalities/<name>/store).
-- The AI's results stored back into the study make it unstable, then stable again: the first rule
-- is what stops that from routing the study a second time (no loop).
--
-- Series-only routing by default: the listener only needs the input series, so only those
-- series are sent -- far fewer bytes than the full study (distractor T1/FLAIR/T2 series are much
-- larger than the crop). HIPPO_ROUTE_SCOPE = "study" sends the whole study instead.
--
-- If the listener is down when a study becomes stable, the job fails and is not retried (Orthanc
-- logs it; GET /jobs shows it): resubmit with POST /jobs/<id>/resubmit, or send the series again
-- with POST /modalities/hippoai/store.
--
-- Orthanc runs Lua callbacks in one context, one at a time: this callback only reads the series
-- list and submits a job; the transfer itself runs asynchronously in Orthanc's job engine.
-- Log lines name Orthanc resource ids (hashes), never patient data.

local ROUTE_TO = HIPPO_ROUTE_TO or 'hippoai'
local ROUTE_SCOPE = HIPPO_ROUTE_SCOPE or 'series'
local INPUT_MARKER = 'hippocrop'
local RESULT_MARKER = 'research use'
local RESULT_SERIES_NUMBERS = { ['9001'] = true, ['9002'] = true, ['9003'] = true }
local RESULT_MODALITIES = { SEG = true, SR = true, OT = true }
local T1_MARKERS = { 't1', 'mprage', 'mp-rage', 'spgr', 'bravo', 'tfe', 'fl3d', 'mp2rage' }
local NOT_T1_MARKERS = { 'locali', 'scout', 'survey', 'aahead', 'gado', 'contrast', 'post', 'flair', 't2',
                         'dwi', 'dti', 'swi', 'tof', 'phase' }

local function Contains(text, needle)
  return text ~= nil and string.find(string.lower(tostring(text)), needle, 1, true) ~= nil
end

local function Trim(text)
  return (string.gsub(tostring(text or ''), '^%s*(.-)%s*$', '%1'))
end

-- Is this series one of the AI's results?
function HippoIsResultSeries(tags)
  if Contains(tags['SeriesDescription'], RESULT_MARKER) then
    return true
  end
  local number = Trim(tags['SeriesNumber'])
  local modality = string.upper(Trim(tags['Modality']))
  return RESULT_SERIES_NUMBERS[number] == true and RESULT_MODALITIES[modality] == true
end

local function ContainsAny(text, needles)
  for _, needle in ipairs(needles) do
    if Contains(text, needle) then
      return true
    end
  end
  return false
end

-- Could this series be a whole-head 3D T1 (by its description or protocol name)?
function HippoIsWholeHeadT1(tags)
  if string.upper(Trim(tags['Modality'])) ~= 'MR' then
    return false
  end
  local names = { tags['SeriesDescription'], tags['ProtocolName'] }
  local t1 = false
  for _, name in pairs(names) do
    if ContainsAny(name, NOT_T1_MARKERS) then
      return false
    end
    t1 = t1 or ContainsAny(name, T1_MARKERS)
  end
  return t1
end

-- The routing decision for a study's expanded series list (GET /studies/<id>/series).
-- Returns (list of input series ids, nil) or (nil, reason to skip).
function HippoRoutingDecision(seriesList)
  local crops, heads = {}, {}
  for _, series in ipairs(seriesList) do
    local tags = series['MainDicomTags'] or {}
    if HippoIsResultSeries(tags) then
      return nil, 'a result series is already there (series ' .. series['ID'] .. ')'
    end
    if Contains(tags['SeriesDescription'], INPUT_MARKER) then
      table.insert(crops, series['ID'])
    elseif HippoIsWholeHeadT1(tags) then
      table.insert(heads, series['ID'])
    end
  end
  if #crops > 0 then
    return crops, nil
  end
  if #heads > 0 then
    return heads, nil
  end
  return nil, 'no HippoCrop or whole-head T1 series'
end

function OnStableStudy(studyId, tags, metadata)
  local ok, seriesList = pcall(function()
    return ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  end)
  if not ok or type(seriesList) ~= 'table' then
    print('HippoVolume routing: study ' .. studyId .. ': cannot list its series: ' .. tostring(seriesList))
    return
  end

  local inputs, reason = HippoRoutingDecision(seriesList)
  if inputs == nil then
    print('HippoVolume routing: study ' .. studyId .. ' not sent: ' .. reason)
    return
  end

  local resources = inputs
  if ROUTE_SCOPE == 'study' then
    resources = { studyId }
  end
  local request = DumpJson({ Resources = resources, Asynchronous = true }, true)
  local sent, answer = pcall(function()
    return RestApiPost('/modalities/' .. ROUTE_TO .. '/store', request)
  end)
  if not sent then
    print('HippoVolume routing: study ' .. studyId .. ': submitting the store job to ' .. ROUTE_TO
          .. ' failed: ' .. tostring(answer))
    return
  end
  local job = '?'
  local parsed, decoded = pcall(ParseJson, answer)
  if parsed and type(decoded) == 'table' and decoded['ID'] ~= nil then
    job = decoded['ID']
  end
  print('HippoVolume routing: study ' .. studyId .. ' -> ' .. ROUTE_TO .. ' (' .. ROUTE_SCOPE .. ': '
        .. table.concat(resources, ', ') .. '), job ' .. job)
end
